# Turnout: traffic-splitting reverse proxy.
#   docker build -t turnout .
#   docker run --rm -p 8080:8080 -p 9901:9901 -v $PWD/config:/etc/turnout turnout run /etc/turnout/blue-green.yaml
# Inside a container the admin address must be reachable from outside only with a token:
# set TURNOUT_ADMIN_TOKEN when `admin:` is not a loopback address.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install . && useradd --system --uid 10001 turnout

USER turnout
EXPOSE 8080 9901
# SIGTERM starts the drain sequence (docs/operations.md); give it drain.delay + drain.shutdown.
STOPSIGNAL SIGTERM
ENTRYPOINT ["turnout"]
CMD ["run", "/app/config/blue-green.yaml"]
