# tag: 3.11
# Stands in for python:3.11-slim-bookworm: Debian bookworm's Python 3.11 with venv and pip, trusting the
# building host's own certificate authorities (pip is pointed at the system store, which holds them).
FROM masktune-standin/debian:bookworm
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 python3-venv python3-pip ca-certificates && rm -rf /var/lib/apt/lists/* \
 && update-ca-certificates >/dev/null && ln -s /usr/bin/python3 /usr/local/bin/python
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
