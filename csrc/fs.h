/* File system calls Python's os module lacks: an atomic swap of two paths, and the type of
 * the file system a path lies on. */
#ifndef PYCPT_FS_H
#define PYCPT_FS_H

#include <stdint.h>
#include <linux/magic.h>

#define PYCPT_FS_TMPFS_MAGIC TMPFS_MAGIC

/* renameat2(a, b, RENAME_EXCHANGE): both must exist; -EINVAL or -ENOSYS where the file
 * system or the kernel cannot. */
int pycpt_fs_exchange(const char *a, const char *b);
/* statfs(path)'s f_type (TMPFS_MAGIC, ...). */
int pycpt_fs_type(const char *path, int64_t *type_out);

#endif
