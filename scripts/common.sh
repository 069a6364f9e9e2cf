# Shared by scripts/test and scripts/demo: installs what is missing, idempotently.
# Sourced, not run.
set -euo pipefail

KVX_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KVX_JOBS=${KVX_JOBS:-$(nproc)}

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf '\nkvx: FAILED: %s\n' "$*" >&2
  exit 1
}

# Debian packages kvx builds, tests and benchmarks with.
KVX_APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config git python3 python3-pip python3-matplotlib
  g++-12 clang-14 libclang-rt-14-dev lld
  libboost1.81-dev nlohmann-json3-dev librange-v3-dev libxxhash-dev
  liburing-dev libhiredis-dev libucx-dev ucx-utils libibverbs-dev librdmacm-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  redis-server redis-tools etcd-server etcd-client iperf3
)

ensure_packages() {
  local missing=()
  for p in "${KVX_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    step "installing Debian packages: ${missing[*]}"
    [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}); run as root or install them with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
  fi
}

ensure_conan() {
  if command -v conan >/dev/null 2>&1; then return 0; fi
  step "installing conan with pip"
  python3 -m pip install -q conan 2>/dev/null || python3 -m pip install -q --break-system-packages conan ||
    die "pip install conan failed"
  hash -r
  command -v conan >/dev/null 2>&1 || die "conan installed but not on PATH"
}
