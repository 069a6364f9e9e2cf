#!/bin/sh
# kvx-topo on a copy of a sysfs fixture with a netdev whose name is not UTF-8.
# usage: non_utf8_netdev.sh KVX_TOPO FIXTURE_DIR
d=$(mktemp -d) || exit 1
cp -a "$2/." "$d" && cp -a "$d/class/net/enp2s0" "$d/class/net/$(printf 'enp\377')" && "$1" --sysfs "$d"
rc=$?
rm -rf "$d"
exit $rc
