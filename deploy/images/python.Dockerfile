# A stand-in for python:3.11-slim-bookworm where no registry can be reached: Debian bookworm's
# python3 (3.11) in a venv at /opt/python that comes first on PATH, so `python` and `pip` mean
# what they mean in the official image. BASE_IMAGE is the debootstrap'd bookworm that
# deploy/build_images.py imports (docs/deploy.md).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python
ENV PATH=/opt/python/bin:$PATH \
    LANG=C.UTF-8
CMD ["python3"]
