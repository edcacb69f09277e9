# ZooKeeper 3.8 standalone from Debian's packages, configured like the official zookeeper:3.8
# image by ZOO_* variables (zookeeper-entrypoint.sh), running as the unprivileged `zookeeper`
# user with its data under /data. Build context: deploy/images/.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# (the JRE's post-install links its man page: slim images lack the folder)
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openjdk-17-jre-headless libzookeeper-java libslf4j-java \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 999 --home-dir /data --no-create-home zookeeper \
    && mkdir -p /data /conf \
    && chown zookeeper /data /conf

COPY zookeeper-entrypoint.sh /usr/local/bin/zookeeper-entrypoint
COPY zookeeper-ready.sh /usr/local/bin/zookeeper-ready
USER 999
VOLUME ["/data"]
EXPOSE 2181
ENTRYPOINT ["zookeeper-entrypoint"]
