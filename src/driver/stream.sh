# converge: stream.sh - reads a tree sent on stdin (what driver/stream.rs writes), shared by the
# scripts that receive one. Lines: `R LEN` (a roles document: LEN bytes follow, into the file
# named by $roles_tmp), `D MODE PATH` (a directory), `F MODE LEN PATH` (a file: LEN bytes
# follow), `S PATH<TAB>TARGET` (a symlink), `K PATH` (the file PATH of the base tree, hard
# linked, else copied), `E COUNT` (the end: COUNT entries came). Modes are octal, kept to their
# owner's bits; names hold no newline or tab; a path is refused unless it is new, below
# directories the stream made (never through a symlink). It relies on umask 077 (lib.sh, which
# every script that reads a stream starts with). File contents are read with `dd
# iflag=count_bytes,fullblock` (GNU and busybox): it reads exactly what it is asked, where
# busybox `head -c` reads ahead into the next line.

# checked_path PATH: refuses absolute paths, `..` and empty names.
checked_path() {
	case /$1/ in
	*/../* | *//* | */./*)
		echo "refused path in the stream: $1" >&2
		return 1
		;;
	esac
	case $1 in
	/* | '') echo "refused path in the stream: $1" >&2; return 1 ;;
	esac
	return 0
}

# real_dirs DIR PATH: every directory above PATH in DIR is a directory, none a symlink, so
# nothing reached through PATH is outside DIR.
real_dirs() {
	_d=$2
	while :; do
		case $_d in
		*/*) _d=${_d%/*} ;;
		*) return 0 ;;
		esac
		if [ -L "$1/$_d" ] || [ ! -d "$1/$_d" ]; then
			echo "refused path in the stream: $2 (below something that is not a directory)" >&2
			return 1
		fi
	done
}

# checked_new DIR PATH: PATH is a path checked_path accepts, new in DIR, below directories the
# stream made: a stream cannot write through a symlink it sent, nor twice to one path.
checked_new() {
	checked_path "$2" && real_dirs "$1" "$2" || return 1
	if [ -e "$1/$2" ] || [ -L "$1/$2" ]; then
		echo "refused path in the stream: $2 (it came twice)" >&2
		return 1
	fi
}

# private MODE: sets $mode to the octal MODE without group, other and special bits (everything
# converge writes on a target is private to its user, whatever the stream says): its owner digit
# followed by 00. A variable, not output: `$(...)` would fork once per entry.
private() {
	case $1 in
	'' | *[!0-7]*)
		echo "refused mode in the stream: $1" >&2
		return 1
		;;
	esac
	mode=00$1
	mode=${mode#"${mode%???}"}
	mode=${mode%??}00
}

# read_bytes N FILE: the next N bytes of stdin into FILE, on disk when it returns (`conv=fsync`:
# one file's data, where a `sync` of the file system would wait for every other writer's too).
# With `fullblock`, dd stops short only at the end of stdin, and then the end line that must
# follow is missing: a short stream is refused by read_entries without counting bytes here.
read_bytes() {
	case $1 in
	'' | *[!0-9]*)
		echo "refused length in the stream: $1" >&2
		return 1
		;;
	esac
	dd bs=65536 count="$1" iflag=count_bytes,fullblock conv=fsync status=none > "$2"
}

# read_entries DIR BASE: reads the stream into DIR until its end line. Lines: `R LEN` (the roles
# document, LEN bytes follow), `D MODE PATH` (a directory), `F MODE LEN PATH` (a file, LEN bytes
# follow), `S PATH<TAB>TARGET` (a symlink), `K PATH` (the file PATH of BASE, hard linked, else
# copied), `E COUNT` (the end; COUNT entries came). Modes are octal, kept to their owner's bits;
# names hold no newline or tab, and every path is new, below directories the stream made.
read_entries() {
	n=0
	while IFS= read -r line; do
		case $line in
		'E '*)
			if [ "${line#E }" != "$n" ]; then
				echo "the stream held $n entries, its end line says ${line#E }" >&2
				return 1
			fi
			return 0
			;;
		'R '*)
			read_bytes "${line#R }" "$roles_tmp" || return 1
			;;
		'D '*)
			r=${line#D }
			m=${r%% *}
			f=${r#* }
			checked_new "$1" "$f" && private "$m" || return 1
			# Made 0700 under umask 077 (lib.sh): chmod only for less.
			mkdir "$1/$f" || return 1
			[ "$mode" = 700 ] || chmod "$mode" "$1/$f" || return 1
			;;
		'F '*)
			r=${line#F }
			m=${r%% *}
			r=${r#* }
			l=${r%% *}
			f=${r#* }
			checked_new "$1" "$f" && private "$m" || return 1
			# Made 0600 under umask 077 (lib.sh): chmod only for another mode.
			read_bytes "$l" "$1/$f" || return 1
			[ "$mode" = 600 ] || chmod "$mode" "$1/$f" || return 1
			;;
		'S '*)
			r=${line#S }
			f=${r%%	*}
			checked_new "$1" "$f" || return 1
			ln -s "${r#*	}" "$1/$f" || return 1
			;;
		'K '*)
			f=${line#K }
			checked_new "$1" "$f" || return 1
			if [ -z "$2" ]; then
				echo "the stream keeps $f, but no base generation was given" >&2
				return 1
			fi
			if ! real_dirs "$2" "$f" || [ -L "$2/$f" ] || [ ! -f "$2/$f" ]; then
				echo "the stream keeps $f, which is not a file of the base generation" >&2
				return 1
			fi
			ln "$2/$f" "$1/$f" 2>/dev/null || cp -p "$2/$f" "$1/$f" || return 1
			;;
		*)
			echo "unexpected line in the stream: $line" >&2
			return 1
			;;
		esac
		n=$((n + 1))
	done
	echo "the stream ended without its end line" >&2
	return 1
}

