# converge: observe.sh - prints facts about this host and the generations under state dir $1,
# one key=value per line: hostname, boot_id, uptime, kernel, then current (the link text of
# $1/current) with current_complete, or current_not_link; confirmed (the link text of
# $1/confirmed: the last generation whose activation was confirmed); activation (an activation
# in progress: generation, attempt, and running, ended or lost); then one generation= per
# complete generation directory and one incomplete= per directory without its .complete marker.
# On a NixOS host (/run/current-system names a store path): nixos_current, nixos_booted, and
# nixos_generation (the system converge's current generation names), and
# nixos_needs_reboot=1 when the booted kernel, initrd or kernel modules differ from the current.
printf 'hostname=%s\n' "$(uname -n)"
read -r boot_id < /proc/sys/kernel/random/boot_id && printf 'boot_id=%s\n' "$boot_id"
read -r up _ < /proc/uptime && printf 'uptime=%s\n' "$up"
printf 'kernel=%s\n' "$(uname -r)"
if [ -L "$1/current" ]; then
	printf 'current=%s\n' "$(readlink "$1/current")"
	if [ -e "$1/current/.complete" ]; then echo current_complete=1; else echo current_complete=0; fi
elif [ -e "$1/current" ]; then
	echo current_not_link=1
fi
if [ -L "$1/confirmed" ]; then
	printf 'confirmed=%s\n' "$(readlink "$1/confirmed")"
fi
record=$(activation_record "$1")
if [ -n "$record" ]; then
	set -- "$1" $record
	if alive "$4" "$5"; then
		state=running
	elif [ -e "$1/generations/$2/activations/$3.status" ]; then
		state=ended
	else
		state=lost
	fi
	printf 'activation=%s %s %s\n' "$2" "$3" "$state"
fi
for g in "$1"/generations/*; do
	[ -d "$g" ] && [ ! -L "$g" ] || continue
	case ${g##*/} in *.partial-*) continue ;; esac
	if [ -e "$g/.complete" ]; then echo "generation=${g##*/}"; else echo "incomplete=${g##*/}"; fi
done
cur=$(readlink -f /run/current-system 2>/dev/null) || cur=
case $cur in /nix/store/?*) [ -e "$cur" ] || cur= ;; *) cur= ;; esac
if [ -n "$cur" ]; then
	printf 'nixos_current=%s\n' "$cur"
	if [ -r "$1/current/artifact/nixos-toplevel" ] && read -r applied < "$1/current/artifact/nixos-toplevel" && [ -n "$applied" ]; then
		printf 'nixos_generation=%s\n' "$applied"
	fi
	booted=$(readlink -f /run/booted-system 2>/dev/null) || booted=
	case $booted in /nix/store/?*) [ -e "$booted" ] || booted= ;; *) booted= ;; esac
	if [ -n "$booted" ]; then
		printf 'nixos_booted=%s\n' "$booted"
		for part in kernel initrd kernel-modules; do
			# A part that does not exist resolves to nothing on both sides.
			a= b=
			[ -e "$cur/$part" ] && a=$(readlink -f "$cur/$part")
			[ -e "$booted/$part" ] && b=$(readlink -f "$booted/$part")
			if [ "$a" != "$b" ]; then
				echo nixos_needs_reboot=1
				break
			fi
		done
	fi
fi
