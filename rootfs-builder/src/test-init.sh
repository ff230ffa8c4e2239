#!/bin/busybox sh
# CNFS test guest init: brings up the basics, the network from the kernel command line,
# loads boot modules and starts the services listed in /etc/cnfs/services.
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=0755,nosuid,nodev run /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
exec </dev/console >/dev/console 2>&1
arg() { for a in $(cat /proc/cmdline); do case "$a" in "$1"=*) echo "${a#*=}";; esac; done; }
for m in $(cat /etc/cnfs/boot-modules); do modprobe "$m" || echo "cnfs-init: modprobe $m failed"; done
hostname "$(arg cnfs.hostname)"
ip link set lo up
ip=$(arg cnfs.ip)
if [ -n "$ip" ]; then
    ip addr add "$ip" dev eth0
    ip link set eth0 up
fi
gw=$(arg cnfs.gw)
[ -n "$gw" ] && ip route add default via "$gw"
# cnfs.hosts=name1/10.0.0.1,name2/10.0.0.2 -> /etc/hosts
echo "127.0.0.1 localhost" > /etc/hosts
for h in $(arg cnfs.hosts | tr ',' ' '); do echo "${h#*/} ${h%/*}" >> /etc/hosts; done
for s in $(cat /etc/cnfs/services); do
    "/usr/bin/$s" </dev/null >/dev/console 2>&1 &
done
echo "cnfs-init: ready"
while :; do wait; sleep 1; done
