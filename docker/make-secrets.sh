#!/bin/sh
# Writes the compose stack's secrets, keeping any that exist:
#   docker/secrets/mqtt_<user>   a random password for each MQTT user: controller, agent, chat,
#                                homeassistant, and every NAME given as an argument (an agent on
#                                another machine: `docker/make-secrets.sh laptop phone`)
#   docker/secrets/api_key       the key of the OpenAI-compatible API
#   docker/mosquitto/passwd      mosquitto's password file: the same users, hashed by mosquitto_passwd
#                                (the local one, else the one in the eclipse-mosquitto:2 image)
# Run it again after adding users; restart mosquitto to load them.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
chmod 700 secrets

random() { LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32; }

for user in controller agent chat homeassistant "$@"; do
  case "$user" in
    *[!A-Za-z0-9_-]*|"") echo "make-secrets: bad user name '$user' (letters, digits, - and _)" >&2; exit 2 ;;
  esac
  [ -s "secrets/mqtt_$user" ] || { random >"secrets/mqtt_$user"; echo "created docker/secrets/mqtt_$user"; }
done
[ -s secrets/api_key ] || { printf 'sk-homering-%s' "$(random)" >secrets/api_key; echo "created docker/secrets/api_key"; }
# the containers run as other users than yours: they read these files through bind mounts
# (the folder itself stays private)
chmod 644 secrets/*

# mosquitto's password file: "user:password" lines, hashed in place (no password on a command line)
plain=mosquitto/passwd.tmp
: >"$plain"
for f in secrets/mqtt_*; do
  printf '%s:%s\n' "${f#secrets/mqtt_}" "$(cat "$f")" >>"$plain"
done
if command -v mosquitto_passwd >/dev/null 2>&1; then
  mosquitto_passwd -U "$plain"
else
  docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/mosquitto:/data" eclipse-mosquitto:2 \
    mosquitto_passwd -U /data/passwd.tmp
fi
chmod 644 "$plain"
mv "$plain" mosquitto/passwd
echo "wrote docker/mosquitto/passwd ($(wc -l <mosquitto/passwd) users)"
