# converge: switch.sh - points $1/current at generation $2 in one rename, so a reader always
# finds either the old link or the new one. $3 makes the temporary link's name unique.
# Exits 3 when generation $2 is not complete.
set -u
if [ ! -e "$1/generations/$2/.complete" ]; then
	echo "generation $2 is not installed" >&2
	exit 3
fi
ln -s "generations/$2" "$1/current.tmp-$3" || exit 1
if ! mv -T "$1/current.tmp-$3" "$1/current"; then
	rm -f "$1/current.tmp-$3"
	exit 1
fi
