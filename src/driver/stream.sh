# converge: stream.sh - reads a tree sent on stdin (what driver/stream.rs writes), shared by the
# scripts that receive one. Lines: `R LEN` (a roles document: LEN bytes follow, into the file
# named by $roles_tmp), `D MODE PATH` (a directory), `F MODE LEN PATH` (a file: LEN bytes
# follow), `S PATH<TAB>TARGET` (a symlink), `K PATH` (the file PATH of the base tree, hard
# linked, else copied), `E COUNT` (the end: COUNT entries came). Modes are octal; names hold no
# newline or tab. File contents are read with `dd iflag=count_bytes,fullblock` (GNU and busybox):
# it reads exactly what it is asked, where busybox `head -c` reads ahead into the next line.

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

# read_bytes N FILE: the next N bytes of stdin into FILE, exactly.
read_bytes() {
	dd bs=65536 count="$1" iflag=count_bytes,fullblock status=none > "$2" || return 1
	got=$(wc -c < "$2") || return 1
	if [ "$got" -ne "$1" ]; then
		echo "the stream ended early ($got of $1 bytes for ${2##*/})" >&2
		return 1
	fi
}

# read_entries DIR BASE: reads the stream into DIR until its end line. Lines: `R LEN` (the roles
# document, LEN bytes follow), `D MODE PATH` (a directory), `F MODE LEN PATH` (a file, LEN bytes
# follow), `S PATH<TAB>TARGET` (a symlink), `K PATH` (the file PATH of BASE, hard linked, else
# copied), `E COUNT` (the end; COUNT entries came). Modes are octal; names hold no newline or tab.
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
			checked_path "$f" || return 1
			mkdir -p "$1/$f" && chmod "$m" "$1/$f" || return 1
			;;
		'F '*)
			r=${line#F }
			m=${r%% *}
			r=${r#* }
			l=${r%% *}
			f=${r#* }
			checked_path "$f" || return 1
			read_bytes "$l" "$1/$f" || return 1
			chmod "$m" "$1/$f" || return 1
			;;
		'S '*)
			r=${line#S }
			f=${r%%	*}
			checked_path "$f" || return 1
			ln -s "${r#*	}" "$1/$f" || return 1
			;;
		'K '*)
			f=${line#K }
			checked_path "$f" || return 1
			if [ -z "$2" ]; then
				echo "the stream keeps $f, but no base generation was given" >&2
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

