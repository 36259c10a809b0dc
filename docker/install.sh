#!/usr/bin/env bash
# The build steps docker/Dockerfile (GPU) and docker/Dockerfile.cpu share, one
# sub-command per image layer, so that both images are made the same way and
# the CPU build (which runs here and in the tests) exercises every one of them.
#
#   install.sh system                 g++ (DeepSpeed's JIT ops, Triton), pdsh,
#                                     OpenSSH client+server, iproute2; ssh
#                                     client defaults for the cluster network
#   install.sh pin-torch              pin the installed torch stack for every
#                                     later pip install (PIP_CONSTRAINT)
#   install.sh dependencies EXTRA     pyproject.toml's dependencies + EXTRA,
#                                     torch excluded (the image's own stays)
#   install.sh user UID               the non-root user `camex` (uid = gid)
#   install.sh project EXTRA          the copied source at $CAMEX_HOME, then a
#                                     check that pyproject.toml is satisfied
#
# Runs from /tmp/build, next to pyproject_deps.py (and pyproject.toml for
# `dependencies`), as the Dockerfiles copy them.
set -euo pipefail

BUILD="$(dirname "$0")"
CAMEX_HOME="${CAMEX_HOME:-/opt/camex_ds}"
CONSTRAINTS=/etc/pip/constraints.txt

step="${1:?usage: install.sh system|pin-torch|dependencies EXTRA|user UID|project EXTRA}"
shift
case "${step}" in
    system)
        # pdsh + OpenSSH: DeepSpeed's default multi-node launcher ssh-es into
        # every host of the hostfile (see `IMAGE sshd` in entrypoint.sh). Peers
        # are other containers of this image on $SSH_PORT, whose host keys are
        # made when they start: no known_hosts checking (a closed cluster
        # network; see docker/README.md).
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            g++ pdsh openssh-client openssh-server iproute2
        rm -rf /var/lib/apt/lists/*
        mkdir -p /run/sshd /etc/ssh/ssh_config.d
        printf 'Host *\n    Port %s\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n' \
            "${SSH_PORT:?}" >/etc/ssh/ssh_config.d/10-camex.conf
        ;;
    pin-torch)
        # pip then fails loudly instead of silently swapping torch for another
        # build (e.g. the CUDA wheel from PyPI), also for users of the image.
        mkdir -p "$(dirname "${CONSTRAINTS}")"
        python "${BUILD}/pyproject_deps.py" constraints >"${CONSTRAINTS}"
        cat "${CONSTRAINTS}"
        ;;
    dependencies)
        python "${BUILD}/pyproject_deps.py" requirements "${BUILD}/pyproject.toml" \
            --extra "${1:?extra}" --exclude torch >"${BUILD}/requirements.txt"
        pip install -r "${BUILD}/requirements.txt"
        ;;
    user)
        # numeric USER in the Dockerfiles: Kubernetes' runAsNonRoot can only verify a number
        groupadd --gid "${1:?uid}" camex
        useradd --create-home --shell /bin/bash --uid "$1" --gid camex camex
        ;;
    project)
        pip install --no-deps "${CAMEX_HOME}"
        rm -rf "${CAMEX_HOME}/build" "${CAMEX_HOME}"/*.egg-info
        python "${BUILD}/pyproject_deps.py" check "${CAMEX_HOME}/pyproject.toml" --extra "${1:?extra}"
        python -c 'import torch, deepspeed, camex_ds; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)'
        chmod 0755 "${CAMEX_HOME}/docker/entrypoint.sh"
        mkdir -p "${CAMEX_HOME}/runs" /data
        chown camex:camex "${CAMEX_HOME}/runs" /data
        ;;
    *)
        echo "install.sh: unknown step '${step}'" >&2
        exit 2
        ;;
esac
