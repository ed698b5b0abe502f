#!/bin/sh
# Transparent proxying with iptables REDIRECT (nat table), for webproxy's [transparent] listener
# with mode = "redirect". Run it on the gateway the clients route through.
#
#   CLIENT_IF=eth1 PROXY_PORT=3129 PORTS=80,22 sh conf/iptables-redirect.sh start
#   CLIENT_IF=eth1 PROXY_PORT=3129 PORTS=80,22 sh conf/iptables-redirect.sh stop
#
# CLIENT_IF   interface the clients' traffic arrives on (required)
# PROXY_PORT  port of the transparent listener ([transparent] listen = ["0.0.0.0:3129"]), default 3129
# PORTS       TCP destination ports to send to webproxy: a list such as 80,22,25 (at most 15),
#             or "all"; default 80. HTTP is served (and cached) by the proxy, anything else is
#             relayed byte-for-byte to the original destination.
# IPV6=1      also install the same rules with ip6tables
#
# webproxy reads the original destination with SO_ORIGINAL_DST, so the rules must stay on the same
# machine as webproxy. Only PREROUTING is used: webproxy's own outgoing connections are never
# redirected, so they cannot loop; a client aiming at webproxy's own listener is refused.
set -eu
ACTION=${1:-start}
: "${CLIENT_IF:?set CLIENT_IF to the interface the clients are on, e.g. CLIENT_IF=eth1}"
PROXY_PORT=${PROXY_PORT:-3129}
PORTS=${PORTS:-80}
CHAIN=WEBPROXY_REDIRECT

if [ "$PORTS" = all ]; then MATCH="-p tcp"; else MATCH="-p tcp -m multiport --dports $PORTS"; fi

apply() {
    ipt=$1
    case $ACTION in
    start)
        $ipt -t nat -N $CHAIN 2>/dev/null || $ipt -t nat -F $CHAIN
        # shellcheck disable=SC2086
        $ipt -t nat -A $CHAIN $MATCH -j REDIRECT --to-ports "$PROXY_PORT"
        $ipt -t nat -C PREROUTING -i "$CLIENT_IF" -j $CHAIN 2>/dev/null ||
            $ipt -t nat -A PREROUTING -i "$CLIENT_IF" -j $CHAIN
        ;;
    stop)
        while $ipt -t nat -D PREROUTING -i "$CLIENT_IF" -j $CHAIN 2>/dev/null; do :; done
        $ipt -t nat -F $CHAIN 2>/dev/null || true
        $ipt -t nat -X $CHAIN 2>/dev/null || true
        ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
    esac
}

# Clients' packets are forwarded to other hosts unless redirected: the gateway must route.
[ "$ACTION" = start ] && sysctl -q -w net.ipv4.ip_forward=1
apply iptables
if [ "${IPV6:-0}" = 1 ]; then
    [ "$ACTION" = start ] && sysctl -q -w net.ipv6.conf.all.forwarding=1
    apply ip6tables
fi
