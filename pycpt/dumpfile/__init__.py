"""The dump file: a CRIU images directory and its signed manifest in one file (OpenVZ's
Dump.CT). Format 2:

The file is a POSIX tar (`tar tvf` lists it), plain or gzip/xz-compressed:

    PYCPT-DUMP      marker, b"PYCPT-DUMP 2\\n": a foreign file is refused at its first
                    bytes, a newer format before anything else is read
    manifest.json   format, versions, kernel, host, creation time, the container's config,
    manifest.sig    and every part's name, size and BLAKE3 hash of each 1 MiB chunk; the
                    signature (Ed25519, this host's key) over the manifest's exact bytes.
                    Here, 2nd and 3rd, when the hashes are known before the parts are written
                    (packed, always when compressed); else after the parts (streamed)
    *.img ...       the images (and any extra files named by the caller), regular files only

Writing hashes every chunk on the other core while it is copied, and is atomic: a temporary
file (O_EXCL, mode 0600 from creation) in the target's directory, fsync, rename, fsync of
the directory. Reading trusts nothing before the signature verifies against this host's key
or a trusted one (`Keys`, `pycpt key trust`), then checks every byte it uses against its
chunk hash, caps everything at the declared sizes, and parses the config against a schema
(check_config). The images inside can then be checked for what they would restore
(check_restorable). Format 1 files (unsigned) are read only when the caller vouches for them.
"""

from pycpt.dumpfile._config import INTERNAL_KEYS, SCHEMA, check_config
from pycpt.dumpfile._keys import Keys, check_signature, fingerprint, key_line, parse_key_line
from pycpt.dumpfile._manifest import (
    CHUNK_SIZE,
    COMPRESSIONS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    SIGNATURE_NAME,
    Manifest,
    Part,
)
from pycpt.dumpfile._reading import (
    DumpFile,
    SignatureInfo,
    compression_of,
    extract_dump_file,
    read_manifest,
    signature_of,
    verify_dump_file,
)
from pycpt.dumpfile._semantic import REQUIRED_NAMESPACES, check_restorable
from pycpt.dumpfile._writing import DumpFileWriter, StreamedPart, write_dump_file

__all__ = [
    "CHUNK_SIZE",
    "COMPRESSIONS",
    "DumpFile",
    "DumpFileWriter",
    "FORMAT_VERSION",
    "INTERNAL_KEYS",
    "Keys",
    "MANIFEST_NAME",
    "MARKER_NAME",
    "Manifest",
    "Part",
    "REQUIRED_NAMESPACES",
    "SCHEMA",
    "SIGNATURE_NAME",
    "SignatureInfo",
    "StreamedPart",
    "check_config",
    "check_signature",
    "check_restorable",
    "compression_of",
    "extract_dump_file",
    "fingerprint",
    "key_line",
    "parse_key_line",
    "read_manifest",
    "signature_of",
    "verify_dump_file",
    "write_dump_file",
]
