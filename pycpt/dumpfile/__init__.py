"""The dump file: a CRIU images directory and its manifest in one file (OpenVZ's Dump.CT).

The file is a POSIX tar (`tar tvf` lists it), plain or gzip/xz-compressed:

    PYCPT-DUMP      marker, b"PYCPT-DUMP <format version>\\n": a foreign file is refused at
                    its first bytes, a newer format before anything else is read
    *.img ...       the images (and any extra files named by the caller), regular files only
    manifest.json   last: format, pycpt and CRIU versions, kernel, creation time, the
                    container's config, and name, size and SHA-256 of every part

Writing reads every image once, hashing it on its way into the archive, and is atomic: a
temporary file (O_EXCL, mode 0600 from creation) in the target's directory, fsync, rename,
fsync of the directory. Reading checks every byte of the archive that carries anything: tar
headers by their checksums, parts by the manifest's SHA-256, the manifest by its own
checksum, the gzip/xz stream by its CRC, and the end of the archive by its exact length.
"""

from pycpt.dumpfile._manifest import (
    COMPRESSIONS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    Manifest,
    Part,
)
from pycpt.dumpfile._reading import (
    compression_of,
    extract_dump_file,
    locate_parts,
    read_manifest,
    verify_dump_file,
)
from pycpt.dumpfile._writing import DumpFileWriter, StreamedPart, write_dump_file

__all__ = [
    "COMPRESSIONS",
    "DumpFileWriter",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MARKER_NAME",
    "Manifest",
    "Part",
    "StreamedPart",
    "compression_of",
    "extract_dump_file",
    "locate_parts",
    "read_manifest",
    "verify_dump_file",
    "write_dump_file",
]
