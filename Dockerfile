# membacking: one image for the manager and the mappers.
FROM python:3.11-slim

# An unprivileged user: the daemon needs no capabilities (memfd_create, mmap and Unix sockets
# only), and mappers of the same uid are accepted by default.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin membacking \
    && mkdir -p /run/membacking \
    && chown membacking:membacking /run/membacking \
    && chmod 0700 /run/membacking

WORKDIR /opt/membacking
# The dependencies first, read from pyproject.toml: this layer is rebuilt only when they change,
# not on every change of the source.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY membacking ./membacking
RUN pip install --no-cache-dir --no-deps .

# The runtime directory is shared between containers through a volume (a new named volume
# takes this directory's owner and mode); fds pass across containers on one host through its
# Unix socket.
ENV MEMBACKING_RUNTIME_DIR=/run/membacking
USER membacking
ENTRYPOINT ["membacking"]
CMD ["--help"]
