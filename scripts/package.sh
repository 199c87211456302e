#!/usr/bin/env bash
# Builds VMBeam's Debian and RPM packages:
#   target/packages/vmbeam_VERSION-RELEASE_amd64.deb (and vmbeam-dbgsym_..._amd64.deb)
#   target/packages/vmbeam-VERSION-RELEASE.x86_64.rpm
#
# Usage: scripts/package.sh [--out DIR] [--release N] [--no-build] [--bin-dir DIR]
#                           [--deb-only | --rpm-only]
#   --out DIR      where the packages go (default: target/packages)
#   --release N    the packaging revision, Debian's -N and RPM's Release (default: 1)
#   --no-build     package the binaries in target/release instead of building them
#   --bin-dir DIR  package the binaries in DIR (implies --no-build)
#
# The .deb is made by dpkg-buildpackage from packaging/debian/ (debhelper), the .rpm by
# rpmbuild from packaging/rpm/vmbeam.spec.in; both package one file tree laid out by
# packaging/install-tree.sh. Man pages and completions come from packaging/gen. See
# packaging/README.md.
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
root=$PWD
abspath() { (cd "$caller" && realpath -m "$1"); }
out=$root/target/packages
release=1
build=1
bin=$root/target/release
want_deb=1
want_rpm=1
while (($#)); do
  case "$1" in
    --out) out=$(abspath "$2"); shift ;;
    --release) release=$2; shift ;;
    --no-build) build=0 ;;
    --bin-dir) bin=$(abspath "$2"); build=0; shift ;;
    --deb-only) want_rpm=0 ;;
    --rpm-only) want_deb=0 ;;
    -h|--help) sed -n '2,18s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "package.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$release" =~ ^[0-9][0-9A-Za-z.+~]*$ ]] || { echo "package.sh: bad --release '$release'" >&2; exit 2; }
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "package.sh: no [workspace.package] version in Cargo.toml" >&2; exit 1; }

packaging/setup-deps.sh build

if ((build)); then
  echo "package.sh: building vmbeamd, vmbeam, vmbeam-hook (release)" >&2
  cargo build --release --quiet -p vmbeamd -p vmbeam-cli -p vmbeam-hook --bins
fi
for b in vmbeamd vmbeam vmbeam-hook; do
  [ -x "$bin/$b" ] || { echo "package.sh: $bin/$b is missing (run without --no-build)" >&2; exit 1; }
done
# Man pages and completions from the clap commands vmbeam and vmbeamd are built from (a
# build of its own: the tool's clap features stay out of the shipped binaries).
cargo build --release --quiet -p vmbeam-pkg-gen

work=$out/build
rm -rf "$work"
mkdir -p "$work"
target/release/vmbeam-pkg-gen --out "$work/gen"

# Replaces a script's line `MARKER fn1 fn2 ...` with those functions of
# packaging/maint/functions.sh (each with its comment, after the file's variables), with
# @INVOKE@ set to INVOKE and, for RPM spec files, % doubled.
inline_functions() { # FILE MARKER INVOKE [ESCAPE_PERCENT]
  local f=$1 marker=$2 invoke=$3 esc=${4:-0}
  awk -v m="$marker" -v lib=packaging/maint/functions.sh -v invoke="$invoke" -v esc="$esc" '
    function emit(line) { gsub(/@INVOKE@/, invoke, line); if (esc) gsub(/%/, "%%", line); print line }
    BEGIN {
      n = 0; cur = ""; pending = ""; prelude = ""; in_prelude = 1
      while ((getline line < lib) > 0) {
        if (match(line, /^[a-z_]+\(\) \{$/)) {
          in_prelude = 0; cur = substr(line, 1, index(line, "(") - 1)
          body[cur] = pending line "\n"; pending = ""; continue
        }
        if (cur != "") { body[cur] = body[cur] line "\n"; if (line == "}") cur = ""; continue }
        if (line ~ /^#/) { pending = pending line "\n"; continue }
        if (in_prelude && line ~ /^[A-Z_]+=/) prelude = prelude line "\n"
        pending = ""
      }
    }
    $1 == m {
      funcs = ""
      for (i = 2; i <= NF; i++) {
        if (!($i in body)) { print "package.sh: no function " $i " in " lib > "/dev/stderr"; exit 1 }
        funcs = funcs "\n" body[$i]
      }
      # Only the variables these functions use.
      out = ""; k = split(prelude, vs, "\n")
      for (j = 1; j < k; j++) if (index(funcs, "$" substr(vs[j], 1, index(vs[j], "=") - 1))) out = out vs[j] "\n"
      out = out funcs
      k = split(out, ls, "\n"); for (j = 1; j < k; j++) emit(ls[j]); next
    }
    { print }' "$f" >"$f.tmp"
  mv "$f.tmp" "$f"
}
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

if ((want_deb)); then
  src=$work/deb/vmbeam-$version
  mkdir -p "$src"
  cp -a packaging/debian "$src/debian"
  for s in postinst prerm postrm; do
    inline_functions "$src/debian/$s" "#VMBEAM_FUNCTIONS#" deb-systemd-invoke
  done
  cat >"$src/debian/changelog" <<CHANGELOG
vmbeam ($version-$release) unstable; urgency=medium

  * Package build of VMBeam $version (changes: /usr/share/doc/vmbeam/changelog.gz).

 -- VMBeam maintainers <maintainers@vmbeam.example>  $(LC_ALL=C date -u -R -d "@$epoch")
CHANGELOG
  cp README.md CHANGELOG.md "$src/"
  packaging/install-tree.sh deb "$src/stage" "$bin" "$work/gen"
  echo "package.sh: dpkg-buildpackage" >&2
  (cd "$src" && dpkg-buildpackage -b -us -uc >"$work/deb/build.log" 2>&1) ||
    { tail -30 "$work/deb/build.log" >&2; echo "package.sh: dpkg-buildpackage failed (log: $work/deb/build.log)" >&2; exit 1; }
  mv "$work"/deb/*.deb "$out/"
fi

if ((want_rpm)); then
  top=$work/rpm
  mkdir -p "$top"/{BUILD,RPMS,SPECS,SOURCES,SRPMS}
  sed -e "s/@VERSION@/$version/g" -e "s/@RELEASE@/$release/g" \
      -e "s/@DATE@/$(LC_ALL=C date -u -d "@$epoch" '+%a %b %d %Y')/" \
      packaging/rpm/vmbeam.spec.in >"$top/SPECS/vmbeam.spec"
  inline_functions "$top/SPECS/vmbeam.spec" "@FUNCTIONS@" systemctl 1
  cp README.md CHANGELOG.md packaging/files/COPYRIGHT "$top/BUILD/"
  packaging/install-tree.sh rpm "$top/stage" "$bin" "$work/gen"
  echo "package.sh: rpmbuild" >&2
  SOURCE_DATE_EPOCH=$epoch rpmbuild -bb --quiet \
      --define "_topdir $top" --define "vmbeam_stage $top/stage" \
      --define "_build_id_links none" \
      "$top/SPECS/vmbeam.spec" >"$top/build.log" 2>&1 ||
    { tail -30 "$top/build.log" >&2; echo "package.sh: rpmbuild failed (log: $top/build.log)" >&2; exit 1; }
  mv "$top"/RPMS/*/*.rpm "$out/"
fi

echo "package.sh: built" >&2
ls -1 "$out"/vmbeam*"$version-$release"*.{deb,rpm} 2>/dev/null || true
