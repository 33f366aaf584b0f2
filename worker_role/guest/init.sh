#!/bin/sh
# vmlend guest init (busybox sh, PID 1 of the tiny OS).
#
# Contract with the host (worker_role/vm/task.py writes the task disk, reads the result disk):
#   disk serial vmlend-task     tar: config (TIMEOUT, LAYERS, NET, END) and run.sh (cd, env, CMD)
#   disk serial vmlend-scratch  ext4, the writable upper layer (its size is the disk cap)
#   disk serial vmlend-layerN   read-only squashfs/erofs, N=0 is the top layer
#   disk serial vmlend-result   sector 0: "VMLEND1 exit=N timeout=0|1 out=0|1"; a tar of /out at 4096
#   port vmlend.stdout / vmlend.stderr   the task's output, live, then END (config) once the
#                                        result header is on disk
#   port vmlend.control (warm guests)   "GO <unix time> <seed hex> <task disk bytes>" once the
#                                        host restored a snapshot of this guest with the task's
#                                        disks behind its devices
# Any failure before the result header is written ends the VM without a result; the host then
# reports a guest failure with the console's last lines, which is why every step says what it does.
export PATH=/bin
/bin/busybox --install -s /bin

fail() {
    echo "vmlend-init: FATAL: $*"
    sync
    poweroff -f
    reboot -f
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sys /sys || fail "mount /sys"
mount -t devtmpfs dev /dev || fail "mount /dev"

while read -r mod; do
    insmod "/lib/modules/$mod" || fail "insmod $mod"
done < /lib/modules/load-order

# Devices appear asynchronously after their driver loads; wait for them by name, boundedly.
# Builtins only, the answer in $found: under TCG every process (even a $(...) subshell) costs
# ~10 ms, and a boot looks up a dozen devices.
find_by() { # find_by <glob of .../attr> <value>: found=/dev node whose attr file holds value
    for f in $1; do
        # read fails at a last line without a newline, as in a disk's serial, having read it.
        value=
        read -r value <"$f" 2>/dev/null
        if [ "$value" = "$2" ]; then
            d=${f%/*}
            found=/dev/${d##*/}
            return 0
        fi
    done
    return 1
}
wait_for() { # wait_for <glob> <value>
    i=0
    while [ $i -lt 600 ]; do
        find_by "$1" "$2" && return 0
        sleep 0.05
        i=$((i + 1))
    done
    fail "no device $2"
}
disk() { wait_for '/sys/block/vd*/serial' "$1"; }
port() { wait_for '/sys/class/virtio-ports/vport*/name' "$1"; }

# What does not depend on the task comes first, so a warm guest has it done in its snapshot.
# The base layer: busybox, so every image has a shell; task layers go above it.
mkdir -p /task /mnt/scratch /mnt/base/bin /mnt/base/dev /mnt/base/proc /mnt/base/sys \
    /mnt/base/tmp /mnt/base/out /mnt/base/root /mnt/base/etc || fail "make directories"
ln /bin/busybox /mnt/base/bin/busybox || fail "base busybox"
/bin/busybox --install -s /mnt/base/bin
ip link set lo up || fail "lo up"
port vmlend.stdout
OUT=$found
port vmlend.stderr
ERR=$found

read -r cmdline </proc/cmdline
if [ "${cmdline#*vmlend.warm=1}" != "$cmdline" ]; then
    # A snapshot is taken of the guest waiting here; every task restores a copy of it with its
    # own disk files behind the same devices (worker_role/vm/warm.py).
    port vmlend.control
    CONTROL=$found
    # Saved with its random number generator seeded, a guest reseeds the moment a restore
    # changes its VM generation ID ("crng reseeded due to virtual machine fork").
    head -c 1 /dev/random >/dev/null || fail "wait for the random number generator"
    # Freed pages are zeros here (init_on_free), which the snapshot leaves out.
    echo 3 >/proc/sys/vm/drop_caches || fail "drop the caches"
    echo "vmlend-init: warm and waiting"
    # A port reads as empty while no host end is connected, as after every restore.
    until read -r word now seed tasksize <"$CONTROL"; do
        sleep 0.01
    done
    [ "$word" = GO ] || fail "unexpected control message"
    # What the kernel read of the devices before the snapshot belongs to other files now:
    # drop every clean cached page, theirs included (one write, no process per device; the
    # guest has written nothing, so nothing is dirty).
    echo 3 >/proc/sys/vm/drop_caches || fail "drop the caches"
    # Clones share the snapshot's random state: the VM generation ID the host changed has made
    # the kernel reseed already; the task's own seed and the clock are the rest.
    echo "$seed" >/dev/urandom || fail "seed the random number generator"
    date -s "@$now" >/dev/null || fail "set the clock"
fi

disk vmlend-task
TASKDEV=$found
if [ -n "${tasksize:-}" ]; then
    # A restored guest's task disk claims more than the archive (busybox tar reads to the end).
    head -c "$tasksize" "$TASKDEV" | tar -xf - -C /task || fail "unpack task from $TASKDEV"
else
    tar -xf "$TASKDEV" -C /task || fail "unpack task from $TASKDEV"
fi
. /task/config || fail "read task config"

disk vmlend-scratch
SCRATCH=$found
mount -t ext4 -o noatime "$SCRATCH" /mnt/scratch || fail "mount scratch $SCRATCH"
mkdir -p /mnt/scratch/upper /mnt/scratch/work

lower=""
n=0
for fstype in $LAYERS; do
    disk "vmlend-layer$n"
    dev=$found
    mkdir -p "/mnt/layer$n"
    mount -t "$fstype" -o ro "$dev" "/mnt/layer$n" || fail "mount layer $n ($fstype) from $dev"
    lower="$lower/mnt/layer$n:"
    n=$((n + 1))
done
mount -t overlay overlay \
    -o "lowerdir=${lower}/mnt/base,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work" \
    /newroot || fail "mount overlay"
mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp /newroot/out
mount -t devtmpfs dev /newroot/dev || fail "mount task /dev"
mount -t proc proc /newroot/proc || fail "mount task /proc"
mount -t sysfs sys /newroot/sys || fail "mount task /sys"

if [ "$NET" = 1 ]; then
    # QEMU user-mode network: fixed addresses; restrict=on leaves only the guestfwd to the proxy.
    # Without udev nothing renames it; it appears once virtio_net has probed the device.
    eth=eth0
    i=0
    while [ ! -e /sys/class/net/$eth ]; do
        [ $i -lt 600 ] || fail "no $eth"
        sleep 0.05
        i=$((i + 1))
    done
    ip link set "$eth" up || fail "$eth up"
    ip addr add 10.0.2.15/24 dev "$eth" || fail "$eth address"
    ip route add default via 10.0.2.2 || fail "default route"
fi

disk vmlend-result
RESULT=$found
cp /task/run.sh /newroot/tmp/.vmlend-run.sh || fail "copy task script"

echo "vmlend-init: starting task"
chroot /newroot /bin/sh /tmp/.vmlend-run.sh </dev/null >"$OUT" 2>"$ERR" &
task=$!
# kill -9 -1 reaches every process but init and the caller: the task and all it spawned.
(sleep "$TIMEOUT" && : >/run/timedout && kill -9 -1) &
watchdog=$!
wait $task
code=$?
kill -9 -1 2>/dev/null
timeout=0
if [ -e /run/timedout ]; then
    timeout=1
    code=124
fi
echo "vmlend-init: task ended: exit=$code timeout=$timeout"

out=0
(cd /newroot/out && tar -cf - .) | dd of="$RESULT" bs=4096 seek=1 2>/dev/null || out=1
printf 'VMLEND1 exit=%d timeout=%d out=%d\n' "$code" "$timeout" "$out" |
    dd of="$RESULT" bs=512 count=1 conv=sync 2>/dev/null || fail "write result"
sync
if [ -n "$END" ]; then
    # The result is on disk: tell the host now rather than when the domain has stopped.
    printf '\000\033VMLEND-END-%s' "$END" >"$OUT"
    printf '\000\033VMLEND-END-%s' "$END" >"$ERR"
fi
umount /newroot/proc /newroot/sys /newroot/dev /newroot /mnt/scratch 2>/dev/null
poweroff -f
reboot -f
