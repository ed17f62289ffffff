#!/bin/sh
# Installs Prometheus (the Debian package's binary, v2.42 on Debian 12) for
# tests/serving/test_prometheus.py, which runs its own Prometheus on temporary files and ports.
# The package's system service is NOT started: policy-rc.d answers 101 ("action forbidden")
# during the install, as in container images. Without root it installs nothing and says so;
# the test then skips with that reason. Used by `make prometheus` and by the test's fixture.
set -eu

if command -v prometheus > /dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_prometheus: not root, so not installing; run: sudo $0" >&2
    exit 0
fi

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus > /dev/null; }; then
    echo "install_prometheus: apt-get could not install prometheus; test_prometheus.py will skip" >&2
    exit 0
fi
prometheus --version | head -n 1
