# converge: ssh_run.sh - runs one command for the SSH driver. First reports, on stderr, the process
# group to kill at a timeout (only when sshd made this command its own session, so the group is
# this command's alone). $1 is a count N, $2..$(N+1) are NAME=VALUE pairs to export, the rest is
# the argv to exec. Exits 127 after printing converge-not-found= when the program does not exist.
read -r _ _ _ _ pgrp sid _ < /proc/$$/stat
if [ "$pgrp" = "$sid" ] && [ "$pgrp" -gt 1 ]; then
	printf 'converge-pgid=%s\n' "$pgrp" >&2
else
	echo 'converge-pgid=' >&2
fi
n=$1
shift
while [ "$n" -gt 0 ]; do
	export "$1" || exit 125
	shift
	n=$((n - 1))
done
if ! command -v "$1" >/dev/null 2>&1; then
	printf 'converge-not-found=%s\n' "$1" >&2
	exit 127
fi
exec "$@"
