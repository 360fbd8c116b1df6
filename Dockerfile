# Turnout: traffic-splitting reverse proxy. docs/operations.md ("Container image") explains it.
#   docker build -t turnout:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#       -e TURNOUT_ADMIN_TOKEN="$(openssl rand -hex 32)" turnout:0.1.0
# Your own routing table: mount a folder holding turnout.yaml over /etc/turnout
# (`-v $PWD/routes:/etc/turnout:ro`); the state file goes to the volume /var/lib/turnout.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A numeric user: Kubernetes' runAsNonRoot can only verify a numeric USER. Its home is the one
# folder Turnout writes: the state file (runtime splits, rollouts) lives there, apart from the
# config, which is root-owned here and read-only when mounted from a ConfigMap.
RUN groupadd --gid 10001 turnout \
    && useradd --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/turnout --shell /usr/sbin/nologin turnout \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/turnout

# The dependencies, read from pyproject.toml alone (with the build backend): this layer is
# rebuilt when they change, not on every edit of the code.
COPY pyproject.toml /tmp/turnout-deps/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/turnout-deps/pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" \
        > /tmp/turnout-deps/requirements.txt \
    && pip install -r /tmp/turnout-deps/requirements.txt \
    && rm -rf /tmp/turnout-deps

# The code: only Turnout itself is installed here, nothing is downloaded. The slim image has no
# C compiler, so the data plane is the pure-Python build (docs/performance.md: compiled builds).
COPY pyproject.toml README.md setup.py MANIFEST.in /tmp/turnout-src/
COPY buildtools /tmp/turnout-src/buildtools
COPY proxy /tmp/turnout-src/proxy
RUN TURNOUT_COMPILE=0 pip install --no-deps --no-build-isolation /tmp/turnout-src \
    && rm -rf /tmp/turnout-src

COPY config/container.yaml /etc/turnout/turnout.yaml

USER 10001:10001
WORKDIR /var/lib/turnout
# Without a volume here, `docker run --read-only` could not write the state file, and a runtime
# split would answer 500.
VOLUME ["/var/lib/turnout"]
# 8080: the data plane (`listen`). 9901: the admin API (`admin`), on 0.0.0.0 in the default config,
# so Turnout starts only with TURNOUT_ADMIN_TOKEN set; /healthz, /readyz and /metrics need no token.
EXPOSE 8080 9901
# Docker's own health state (Kubernetes ignores it and uses the probes): exit 0 when /readyz
# answers 200. It finds the admin port in the config it runs (a wildcard address is asked on
# loopback) and needs no token; running another config file, point --config at it here too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["turnout", "healthcheck", "--config", "/etc/turnout/turnout.yaml"]
ENTRYPOINT ["turnout"]
CMD ["run", "/etc/turnout/turnout.yaml"]
