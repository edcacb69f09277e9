#!/bin/sh
# Writes /conf/zoo.cfg from the variables the official zookeeper image reads, then runs a
# standalone server in the foreground (logs on stderr through slf4j-simple).
set -eu
conf=/conf/zoo.cfg
{
    echo "tickTime=${ZOO_TICK_TIME:-2000}"
    echo "initLimit=${ZOO_INIT_LIMIT:-5}"
    echo "syncLimit=${ZOO_SYNC_LIMIT:-2}"
    echo "maxClientCnxns=${ZOO_MAX_CLIENT_CNXNS:-60}"
    echo "dataDir=/data"
    echo "clientPort=2181"
    echo "admin.enableServer=${ZOO_ADMINSERVER_ENABLED:-false}"
    echo "4lw.commands.whitelist=${ZOO_4LW_COMMANDS_WHITELIST:-ruok,srvr,stat,mntr}"
    for kv in ${ZOO_CFG_EXTRA:-}; do echo "$kv"; done
} > "$conf"
exec java ${JVMFLAGS:--Xmx256m -XX:+UseSerialGC} \
    -cp /usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar \
    -Dorg.slf4j.simpleLogger.defaultLogLevel="${ZOO_LOG_LEVEL:-warn}" \
    org.apache.zookeeper.server.ZooKeeperServerMain "$conf"
