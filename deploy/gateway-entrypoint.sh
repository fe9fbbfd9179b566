#!/bin/sh
# Gateway container entrypoint: fill deploy/nginx.conf's ${PLACEHOLDERS} from the
# environment (only these names, so nginx's own $variables survive), test, then run nginx
# in the foreground. The list must match the template; tests/deploy checks that it does.
set -eu
TEMPLATE_VARS='${NGINX_LISTEN} ${NGINX_RUN_DIR} ${NGINX_LOG_DIR} ${UPSTREAM} ${RATE_LIMIT} ${RATE_BURST} ${MAX_BODY_SIZE}'
mkdir -p "${NGINX_RUN_DIR}"
envsubst "${TEMPLATE_VARS}" < /etc/influence/nginx.conf.template > "${NGINX_RUN_DIR}/nginx.conf"
nginx -t -q -c "${NGINX_RUN_DIR}/nginx.conf"
exec nginx -c "${NGINX_RUN_DIR}/nginx.conf" -g 'daemon off;'
