# converge: prune.sh - removes generations $2... under state dir $1, skipping the ones that
# current and confirmed point at. The .complete marker goes first, so a removal cut short leaves
# an incomplete generation, never a damaged one that still looks complete.
d=$1
shift
current=$(readlink "$d/current" 2>/dev/null) || current=
confirmed=$(readlink "$d/confirmed" 2>/dev/null) || confirmed=
for n in "$@"; do
	[ "$current" = "generations/$n" ] && continue
	[ "$confirmed" = "generations/$n" ] && continue
	rm -f "$d/generations/$n/.complete" && rm -rf "$d/generations/$n" || exit 1
done
