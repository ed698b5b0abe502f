#!/bin/sh
# Transparent proxying with TPROXY (mangle table), for webproxy's [transparent] listener with
# mode = "tproxy". Unlike REDIRECT, packets keep their destination address; webproxy listens with
# IP_TRANSPARENT (root or CAP_NET_ADMIN) and reads the original destination from the socket. With
# spoof_client_address = true it also connects upstream from the client's own address.
#
#   CLIENT_IF=eth1 PROXY_PORT=3130 PORTS=80,443 sh conf/iptables-tproxy.sh start
#   CLIENT_IF=eth1 PROXY_PORT=3130 PORTS=80,443 sh conf/iptables-tproxy.sh stop
#
# CLIENT_IF   interface the clients' traffic arrives on (required)
# PROXY_PORT  port of the transparent listener ([transparent] listen = ["0.0.0.0:3130"]), default 3130
# PORTS       TCP destination ports to divert: a list such as 80,443 (at most 15) or "all"; default 80
# MARK        firewall mark used for local delivery, default 1
# TABLE       routing table for marked packets, default 100
# IPV6=1      also install the IPv6 rules and routes
#
# How it works: TPROXY hands a matching packet to the listener and marks it; `ip rule` sends marked
# packets to a table whose only route says "every address is local", so the kernel delivers them
# instead of forwarding. The `-m socket --transparent` rule marks packets that belong to sockets
# webproxy already has, which covers established connections and the server's replies to upstream
# connections made from the client's address.
set -eu
ACTION=${1:-start}
: "${CLIENT_IF:?set CLIENT_IF to the interface the clients are on, e.g. CLIENT_IF=eth1}"
PROXY_PORT=${PROXY_PORT:-3130}
PORTS=${PORTS:-80}
MARK=${MARK:-1}
TABLE=${TABLE:-100}
DIVERT=WEBPROXY_DIVERT
TPROXY=WEBPROXY_TPROXY

if [ "$PORTS" = all ]; then MATCH="-p tcp"; else MATCH="-p tcp -m multiport --dports $PORTS"; fi

apply() {
    ipt=$1 ip=$2 any=$3
    case $ACTION in
    start)
        $ipt -t mangle -N $DIVERT 2>/dev/null || $ipt -t mangle -F $DIVERT
        $ipt -t mangle -A $DIVERT -j MARK --set-mark "$MARK"
        $ipt -t mangle -A $DIVERT -j ACCEPT
        $ipt -t mangle -N $TPROXY 2>/dev/null || $ipt -t mangle -F $TPROXY
        # shellcheck disable=SC2086
        $ipt -t mangle -A $TPROXY $MATCH -j TPROXY --on-port "$PROXY_PORT" --tproxy-mark "$MARK/$MARK"
        $ipt -t mangle -C PREROUTING -p tcp -m socket --transparent -j $DIVERT 2>/dev/null ||
            $ipt -t mangle -A PREROUTING -p tcp -m socket --transparent -j $DIVERT
        $ipt -t mangle -C PREROUTING -i "$CLIENT_IF" -j $TPROXY 2>/dev/null ||
            $ipt -t mangle -A PREROUTING -i "$CLIENT_IF" -j $TPROXY
        $ip rule show | grep -q "fwmark $(printf '%#x' "$MARK") lookup $TABLE" ||
            $ip rule add fwmark "$MARK" lookup "$TABLE"
        $ip route replace local "$any" dev lo table "$TABLE"
        ;;
    stop)
        while $ipt -t mangle -D PREROUTING -i "$CLIENT_IF" -j $TPROXY 2>/dev/null; do :; done
        while $ipt -t mangle -D PREROUTING -p tcp -m socket --transparent -j $DIVERT 2>/dev/null; do :; done
        for c in $TPROXY $DIVERT; do
            $ipt -t mangle -F $c 2>/dev/null || true
            $ipt -t mangle -X $c 2>/dev/null || true
        done
        while $ip rule del fwmark "$MARK" lookup "$TABLE" 2>/dev/null; do :; done
        $ip route flush table "$TABLE" 2>/dev/null || true
        ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
    esac
}

if [ "$ACTION" = start ]; then
    sysctl -q -w net.ipv4.ip_forward=1
    # Replies to connections made from the client's address arrive on the server-side interface
    # for an address that is not ours; strict reverse-path filtering would drop them.
    sysctl -q -w net.ipv4.conf.all.rp_filter=0
fi
apply iptables "ip" 0.0.0.0/0
if [ "${IPV6:-0}" = 1 ]; then
    [ "$ACTION" = start ] && sysctl -q -w net.ipv6.conf.all.forwarding=1
    apply ip6tables "ip -6" ::/0
fi
