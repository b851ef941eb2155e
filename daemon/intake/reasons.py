"""Why intake could not take an inbox entry: one code per cause (main process)."""

from __future__ import annotations

# Until daemon.models.Reason lands (redesign branch), the codes live here, in one place.
PERMISSION_DENIED = "permission_denied"  # EACCES/EPERM opening the file: left in the inbox
VANISHED = "vanished"  # ENOENT between the listing and the claim: nothing to account
CHANGED_AFTER_CHECK = "changed_after_check"  # inode/size/mtime/owner/links moved under us
SYMLINK = "symlink"  # a link (lstat, or ELOOP from O_NOFOLLOW)
CLAIM_FAILED = "claim_failed"  # the rename into the spool was refused (EXDEV, EPERM …)
TOO_LARGE = "too_large"
HARD_LINK = "hard_link"
OWNER_NOT_ALLOWED = "owner_not_allowed"
DIRECTORY = "directory"
FIFO = "fifo"
SOCKET = "socket"
DEVICE = "device"
NOT_REGULAR_FILE = "not_regular_file"
