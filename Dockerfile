# membacking: one image for the manager and the mappers.
FROM python:3.11-slim
WORKDIR /opt/membacking
COPY pyproject.toml README.md ./
COPY membacking ./membacking
RUN pip install --no-cache-dir .
# The runtime directory is shared between containers through a volume; fds pass across
# containers on one host through its Unix socket.
ENV MEMBACKING_RUNTIME_DIR=/run/membacking
ENTRYPOINT ["membacking"]
CMD ["--help"]
