# Shared by scripts/build-static and qemu-tests/run: cargo for fully static musl
# binaries (x86_64 and aarch64). Source it, then:
#   static_cargo <amd64|arm64> build --profile dist -p <package> [--bin <bin>]
# The output lands in target/<triple>/dist/. scripts/bootstrap installs the toolchain.
#
# rustup's toolchain has only the x86_64 glibc std, so this uses Debian's rustc-web with
# the std sources (-Z build-std) and the gcc cross toolchains as linkers, against musl's
# static libc.

# The Rust target triple of an OCI architecture name.
static_triple() {
  case $1 in
    amd64) echo x86_64-unknown-linux-musl ;;
    arm64) echo aarch64-unknown-linux-musl ;;
    *) echo "unknown architecture '$1' (expected amd64 or arm64)" >&2; return 2 ;;
  esac
}

# std's unwinder needs a static libunwind.a; Debian ships LLVM's (built against glibc,
# so it calls __fprintf_chk, which musl lacks: a one-function shim forwards it to
# vfprintf). gcc's crtbegin/crtend objects complete the self-contained link.
static_link_dir() { # <amd64|arm64> -> prints the directory
  local arch=$1 cpu
  cpu=$(static_triple "$arch") || return 2
  cpu=${cpu%%-*}
  local dir=$STATIC_ROOT/target/static-link/$cpu
  if [ ! -f "$dir/libunwind.a" ]; then
    echo "static-toolchain: preparing the static link directory for $cpu" >&2
    local tmp
    tmp=$(mktemp -d)
    chmod 755 "$tmp"
    (cd "$tmp" && apt-get download -qq "libunwind-22-dev:$arch" 2>/dev/null) >&2
    dpkg-deb -x "$tmp"/libunwind-22-dev_*_"$arch".deb "$tmp/x"
    cp "$tmp/x/usr/lib/llvm-22/lib/libunwind.a" "$tmp/libunwind.a"
    cat >"$tmp/fprintf_chk.c" <<'C'
#include <stdarg.h>
#include <stdio.h>
int __fprintf_chk(FILE *stream, int flag, const char *format, ...) {
    (void)flag;
    va_list args;
    va_start(args, format);
    int written = vfprintf(stream, format, args);
    va_end(args);
    return written;
}
C
    "$cpu-linux-musl-gcc" -O2 -c "$tmp/fprintf_chk.c" -o "$tmp/fprintf_chk.o"
    ar rs "$tmp/libunwind.a" "$tmp/fprintf_chk.o" 2>/dev/null
    mkdir -p "$dir"
    for obj in crtbegin.o crtend.o crtbeginS.o crtendS.o; do
      ln -sf "$("$cpu-linux-gnu-gcc" -print-file-name=$obj)" "$dir/$obj"
    done
    mv "$tmp/libunwind.a" "$dir/libunwind.a"
    rm -rf "$tmp"
  fi
  echo "$dir"
}

# cargo <args> for <arch>'s musl target, fully static (relocation-model=static: a plain
# static executable, not static-pie), build paths remapped so any checkout builds the
# same bytes.
static_cargo() { # <amd64|arm64> <cargo args...>
  local arch=$1
  shift
  local triple cpu link_dir
  triple=$(static_triple "$arch") || return 2
  cpu=${triple%%-*}
  link_dir=$(static_link_dir "$arch") || return 1
  local sub=$1
  shift
  # C code (ring) compiles against musl's headers: cc-rs would otherwise derive the
  # compiler from the linker's name and use glibc's.
  local cc_var="CC_${triple//-/_}"
  (cd "$STATIC_ROOT" && export "$cc_var=$cpu-linux-musl-gcc" && RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 /usr/bin/cargo "$sub" \
    --locked --target "$triple" -Z build-std=std,panic_abort \
    --config "target.$triple.linker='$cpu-linux-gnu-gcc'" \
    --config "target.$triple.rustflags=['-C','link-self-contained=yes','-C','relocation-model=static','-L','native=/usr/lib/$cpu-linux-musl','-L','native=$link_dir','--remap-path-prefix=$STATIC_ROOT=/merbridge-edge','--remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo']" \
    "$@")
}

# Fails unless <file> is a fully static executable (no interpreter, no dynamic section).
static_check() { # <file>
  if readelf -lW "$1" | grep -qE 'INTERP|DYNAMIC'; then
    echo "static-toolchain: $1 is not fully static:" >&2
    readelf -lW "$1" | grep -E 'INTERP|DYNAMIC' >&2
    return 1
  fi
}

STATIC_ROOT=${STATIC_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
