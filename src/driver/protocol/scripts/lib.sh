# converge: lib.sh - functions the protocol scripts share (each script is this file followed by
# its own text). POSIX sh and coreutils only. Everything converge writes on a target is private
# to the user it runs as: umask 077.
umask 077
set -u

# alive PID BOOT: whether PID is a live (not zombie) process of this boot.
alive() {
	read -r _boot < /proc/sys/kernel/random/boot_id
	[ "$2" = "$_boot" ] || return 1
	_stat=
	read -r _stat 2>/dev/null < "/proc/$1/stat" || return 1
	case $_stat in
	*') Z '*) return 1 ;;
	esac
	return 0
}

# point NAME TARGET TAG: makes the symlink NAME point at TARGET in one rename; TAG keeps the
# temporary link's name unique.
point() {
	ln -s "$2" "$1.tmp-$3" || return 1
	if ! mv -T "$1.tmp-$3" "$1"; then
		rm -f "$1.tmp-$3"
		return 1
	fi
}

# activation_record STATE: prints "generation attempt pid boot started" of the activation in
# progress under STATE, or nothing.
activation_record() {
	[ -e "$1/activation/record" ] || return 0
	cat "$1/activation/record" 2>/dev/null
}
