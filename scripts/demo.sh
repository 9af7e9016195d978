#!/usr/bin/env bash
# The main job: boot a sandbox, run code in it, BRANCH it into children while it runs, and
# show that children start from the exact same state and then diverge.
set -euo pipefail
cd "$(dirname "$0")/.."
forkd=${FORKD:-target/release/forkd}

say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }

say "boot a sandbox"
id=$("$forkd" create --image tiny --memory 256M)
trap '"$forkd" rm "$id" ${children:-} >/dev/null 2>&1 || true' EXIT
echo "sandbox $id"

say "run code in it"
"$forkd" exec "$id" -- uname -a
"$forkd" exec "$id" -- sh -c 'seq 1 100 | grep 7 | wc -l'

say "leave state behind: a file on disk and a process counting in memory"
"$forkd" exec "$id" -- sh -c 'echo "written before the branch" > /root/note.txt'
"$forkd" exec "$id" -- sh -c 'setsid sh -c "n=0; while true; do n=\$((n+1)); echo \$n > /tmp/count; sleep 1; done" >/dev/null 2>&1 </dev/null &'
sleep 3

say "BRANCH it into 3 children (the source keeps running)"
branch_json=$("$forkd" branch "$id" -n 3 --json)
echo "$branch_json"
children=$(echo "$branch_json" | python3 -c 'import json,sys; print(" ".join(c["id"] for c in json.load(sys.stdin)["children"]))')

say "every child starts from the source's state: same file, same counter process"
for c in $children; do
    "$forkd" exec "$c" -- sh -c "echo \"$c: \$(cat /root/note.txt); counter at \$(cat /tmp/count)\""
done

say "then they diverge: each child writes its own file; the source does not see it"
i=0
for c in $children; do
    i=$((i+1))
    "$forkd" exec "$c" -- sh -c "echo 'child $i was here' > /root/note.txt"
done
for c in $children; do
    "$forkd" exec "$c" -- sh -c "echo \"$c: \$(cat /root/note.txt)\""
done
"$forkd" exec "$id" -- sh -c "echo \"source $id: \$(cat /root/note.txt)\""

say "memory: children share the source's pages copy-on-write (see PSS)"
"$forkd" ls
