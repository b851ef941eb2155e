#!/bin/sh
# Runs "$@" in a mount namespace of its own shaped like the unit's file-system sandbox:
# ProtectSystem=strict (every mount read-only but /dev, /proc and /sys), ReadWritePaths=
# ($WRITABLE stays writable) and PrivateTmp=yes (a fresh, empty /tmp). $KEEP: folders under /tmp
# the command itself needs (a checkout there), carried read-only into the fresh /tmp.
# Start it with `unshare --mount --propagation private`; nothing leaves the namespace.
set -eu
hold=$(mktemp -d /run/medbatch-hold.XXXXXX)
for keep in $KEEP; do
  mkdir -p "$hold$keep"
  mount --bind "$keep" "$hold$keep"
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
for keep in $KEEP; do
  mkdir -p "$keep"
  mount --bind "$hold$keep" "$keep"
  umount "$hold$keep"
done
find "$hold" -depth -type d -exec rmdir {} +  # empty now: rmdir never removes what it holds
mount --bind "$WRITABLE" "$WRITABLE"
awk '{print $5}' /proc/self/mountinfo | while read -r point; do
  case "$point" in
    /proc | /proc/* | /sys | /sys/* | /dev | /dev/* | /tmp | "$WRITABLE") ;;
    *) mount -o remount,bind,ro "$point" ;;
  esac
done
unset WRITABLE KEEP
exec "$@"
