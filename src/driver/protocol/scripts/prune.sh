# converge: prune.sh - removes generations $2... under state dir $1, skipping the ones that
# current and confirmed point at. The .complete marker goes first, so a removal cut short leaves
# an incomplete generation, never a damaged one that still looks complete.
# When the generations left are NixOS systems (artifact/nixos-toplevel), the system profile's
# generations that none of them names go too, never the profile's current one.
d=$1
shift
current=$(readlink "$d/current" 2>/dev/null) || current=
confirmed=$(readlink "$d/confirmed" 2>/dev/null) || confirmed=
for n in "$@"; do
	[ "$current" = "generations/$n" ] && continue
	[ "$confirmed" = "generations/$n" ] && continue
	rm -f "$d/generations/$n/.complete" && rm -rf "$d/generations/$n" || exit 1
done
p=/nix/var/nix/profiles/system
[ -L "$p" ] || exit 0
keep=
for f in "$d"/generations/*/artifact/nixos-toplevel; do
	[ -r "$f" ] && read -r t < "$f" && keep="$keep $t"
done
[ -n "$keep" ] || exit 0
profile_current=$(readlink "$p")
old=
for l in "$p"-*-link; do
	[ -L "$l" ] || continue
	[ "${l##*/}" = "$profile_current" ] && continue
	case " $keep " in *" $(readlink "$l") "*) continue ;; esac
	n=${l##*/system-}
	n=${n%-link}
	case $n in '' | *[!0-9]*) continue ;; esac
	old="$old $n"
done
[ -z "$old" ] && exit 0
# shellcheck disable=SC2086 # generation numbers, digits only
nix-env -p "$p" --delete-generations $old >/dev/null
