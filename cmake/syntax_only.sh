#!/bin/sh
# Compile launcher of a -fsyntax-only build: runs the compile, then creates
# the object file it names (after -o), so the build system finds its output.
# As link launcher (first argument --link): a link of such empty objects
# would fail, so it only creates the executable or library it names; a
# command without -o (an archiver's) runs as is.
link=0
if [ "$1" = "--link" ]; then
  link=1
  shift
fi
out=""
prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  prev="$a"
done
if [ "$link" = 0 ] || [ -z "$out" ]; then
  "$@" || exit $?
fi
[ -n "$out" ] && : > "$out"
exit 0
