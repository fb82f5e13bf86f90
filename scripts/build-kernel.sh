#!/usr/bin/env bash
# Builds vireo's guest kernel (an uncompressed vmlinux that vireo boots through PVH) from
# Debian's linux-source package, with resources/linux/microvm.fragment applied on top of
# `make allnoconfig`.
#
#   scripts/build-kernel.sh [VERSION] [--config-only]
#
# VERSION is the linux-source-VERSION package (default 6.1; 6.12 where the distribution has it).
# The kernel goes to ${VIREO_KERNEL_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/vireo}/vmlinux,
# where `vireo run --rootfs` looks for it; the resolved configuration is written next to the
# fragment as microvm-x86_64-VERSION.config. --config-only stops after the configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
version=6.1
config_only=
for arg in "$@"; do
    case "$arg" in
        --config-only) config_only=1 ;;
        [0-9]*) version=$arg ;;
        *) echo "usage: $0 [VERSION] [--config-only]" >&2; exit 2 ;;
    esac
done
fragment=$repo/resources/linux/microvm.fragment
out_dir=${VIREO_KERNEL_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/vireo}
build=$repo/target/linux-build/$version

need=()
[ -f /usr/src/linux-source-$version.tar.xz ] || need+=(linux-source-$version)
for tool in flex bison bc make gcc; do command -v $tool >/dev/null || need+=($tool); done
[ -f /usr/include/libelf.h ] || need+=(libelf-dev)
[ -f /usr/include/openssl/opensslv.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "build-kernel: missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ! apt-get install -y -qq --no-install-recommends "${need[@]}"; then
        echo "build-kernel: could not install ${need[*]} (is linux-source-$version in this distribution?)" >&2
        exit 1
    fi
fi

if [ ! -f "$build/Makefile" ]; then
    mkdir -p "$build"
    tar -xJf /usr/src/linux-source-$version.tar.xz -C "$build" --strip-components=1
fi
cd "$build"
make -s allnoconfig KCONFIG_ALLCONFIG="$fragment"
# Every option the fragment sets must have survived Kconfig's dependency resolution.
lost=0
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    opt=${line%%=*}; want=${line#*=}
    if [ "$want" = n ]; then
        grep -qx "$opt=y" .config && { echo "build-kernel: $opt should be off" >&2; lost=1; }
    else
        grep -qx "$line" .config || { echo "build-kernel: $line did not survive Kconfig (dependency missing?)" >&2; lost=1; }
    fi
done < "$fragment"
[ $lost = 0 ] || exit 1
cp .config "$repo/resources/linux/microvm-x86_64-$version.config"
echo "build-kernel: configuration in resources/linux/microvm-x86_64-$version.config"
[ -z "$config_only" ] || exit 0

start=$(date +%s)
make -s -j"$(nproc)" vmlinux
mkdir -p "$out_dir"
cp vmlinux "$out_dir/vmlinux"
echo "build-kernel: $out_dir/vmlinux ($(stat -c %s vmlinux) bytes) built in $(( $(date +%s) - start )) s"
