# converge: upload.sh - receives a tree or one file sent on stdin with converge's stream framing
# (stream.sh), so a target needs no SFTP subsystem. $1 is the partial directory to receive into
# (it must not exist; its parent must), $2 the destination (it must not exist), $3 `tree` (the
# stream's entries are the tree: the partial directory is renamed to $2) or `file` (the stream
# holds one file named `file`: it is linked to $2, never replacing one). The partial directory is
# removed on failure. Exits 0 when $2 is in place, 4 when $2 existed already, 1 otherwise.
roles_tmp=/dev/null
mkdir -- "$1" || exit 1
if ! read_entries "$1" ""; then
	rm -rf -- "$1"
	exit 1
fi
if [ -e "$2" ] || [ -L "$2" ]; then
	rm -rf -- "$1"
	echo "$2 exists already" >&2
	exit 4
fi
case $3 in
tree)
	mv -T -- "$1" "$2" || { rm -rf -- "$1"; exit 1; }
	;;
file)
	# A link never replaces an existing name (a rename would).
	if ! ln -- "$1/file" "$2"; then
		rm -rf -- "$1"
		[ -e "$2" ] && exit 4
		exit 1
	fi
	rm -rf -- "$1"
	;;
*)
	rm -rf -- "$1"
	echo "unknown upload kind: $3" >&2
	exit 1
	;;
esac
