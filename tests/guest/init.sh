#!/bin/sh
# /init of the ovsfs test guest (busybox sh; PID 1 of a busybox-static initramfs).
#
# The job comes from the kernel command line (/proc/cmdline):
#   ovsfs.job=write|verify|trim|writeloop|info  ovsfs.seed=S  ovsfs.mib=N
#   [ovsfs.count=K ovsfs.writers=W] (writeloop: stop after chunk K-1, W loops at once)
# Every result is one line on the serial console starting with "OVSFS " (or, in a writeloop,
# "WRITING n" just before chunk n's write and "ACKED n" after its fsync returned),
# parsed by tests/guest/boot.py; tests/guest/pattern.py makes the same bytes on the host.
# Every path ends with `poweroff -f` (and -no-reboot + panic=-1 turn a crash of this script
# into a QEMU exit too), so a boot never outlives its job.

/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin

say() { echo "OVSFS $*"; }
t() { echo "T $(cut -d" " -f1 /proc/uptime) $*"; }
finish() {
    say "DONE rc=$1"
    sync
    sleep 0.2   # let the UART drain the last lines before the power goes
    poweroff -f
}

job=info; seed=1; mib=4; count=0; writers=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ovsfs.job=*) job=${arg#ovsfs.job=} ;;
        ovsfs.seed=*) seed=${arg#ovsfs.seed=} ;;
        ovsfs.mib=*) mib=${arg#ovsfs.mib=} ;;
        ovsfs.count=*) count=${arg#ovsfs.count=} ;;
        ovsfs.writers=*) writers=${arg#ovsfs.writers=} ;;
    esac
done
say "JOB job=$job seed=$seed mib=$mib count=$count"

# Module order = dependency order (virtio_blk needs virtio and virtio_ring; virtio_pci needs
# both pci helpers). A module the kernel has built in is simply missing here: skip it.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done

# The disk shows up asynchronously after virtio_blk's probe.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then say "ERROR no /dev/vda"; finish 2; fi

# What the back end's config space told the guest (GET_CONFIG): tests compare these.
q=/sys/block/vda/queue
rd() { cat "$1" 2>/dev/null || echo -; }
say "DEV size=$(( $(cat /sys/block/vda/size) * 512 )) ro=$(rd /sys/block/vda/ro)" \
    "lbs=$(rd $q/logical_block_size) pbs=$(rd $q/physical_block_size)" \
    "min_io=$(rd $q/minimum_io_size) opt_io=$(rd $q/optimal_io_size)" \
    "discard_max=$(rd $q/discard_max_bytes) discard_gran=$(rd $q/discard_granularity)" \
    "wz_max=$(rd $q/write_zeroes_max_bytes) max_segments=$(rd $q/max_segments)" \
    "max_hw_kb=$(rd $q/max_hw_sectors_kb) queues=$(ls /sys/block/vda/mq | wc -l)" \
    "serial=$(rd /sys/block/vda/serial)"

# How often blk-mq ran each hardware queue (= virtqueue) to dispatch requests, from its
# debugfs ("run"; 6.1 has no per-queue request counts any more).
queue_counts() {
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    line=""
    for h in /sys/kernel/debug/block/vda/hctx*; do
        [ -f "$h/run" ] && line="$line ${h##*/}=$(cat "$h/run")"
    done
    say "QUEUES$line"
}

# The pattern, made in a file on the RAM root (awk straight into a pipe costs seconds under
# TCG: 64-byte writes, each waking the reader): 64-byte lines "ovsfs seed=S line=L" (L = byte offset / 64), space padded,
# newline ended; writeloop chunk n (64 KiB at slot n mod (16 * mib)) has "chunk=n" in its lines.
pattern() {  # pattern MIB > /tmp/pattern
    awk -v s="$seed" -v n="$1" 'BEGIN { for (i = 0; i < n * 16384; i++)
        printf("%-63s\n", "ovsfs seed=" s " line=" i) }' > /tmp/pattern
}
chunk() {  # chunk N FILE
    awk -v s="$seed" -v c="$1" 'BEGIN { for (i = 0; i < 1024; i++)
        printf("%-63s\n", "ovsfs seed=" s " chunk=" c " line=" i) }' > "$2"
}
sum() { sha256sum "$@" | cut -d' ' -f1; }
disk_sum() {
    dd if=/dev/vda bs=1M count="$mib" iflag=direct status=none | sum
}

case "$job" in
info)
    finish 0 ;;
write)
    # O_DIRECT writes, then fsync (a virtio-blk FLUSH): the bytes are on the back end's
    # durable path before the checksum line is printed.
    # With several CPUs, one writer per CPU on its own MiB range at the same time: blk-mq
    # gives each CPU its own virtqueue, so every queue carries requests.
    pattern "$mib"
    cpus=$(nproc); per=$(( (mib + cpus - 1) / cpus )); pids=""; c=0
    while [ $c -lt "$cpus" ] && [ $((c * per)) -lt "$mib" ]; do
        at=$((c * per)); n=$per; [ $((at + n)) -gt "$mib" ] && n=$((mib - at))
        taskset -c $c dd if=/tmp/pattern of=/dev/vda bs=1M skip=$at seek=$at count=$n \
            oflag=direct conv=fsync,notrunc status=none &
        pids="$pids $!"; c=$((c + 1))
    done
    rc=0
    for p in $pids; do wait $p || rc=1; done
    if [ $rc != 0 ]; then say "ERROR write failed"; finish 1; fi
    say "WRITE sha256=$(sum /tmp/pattern) writers=$c"
    queue_counts
    say "READBACK sha256=$(disk_sum)"
    finish 0 ;;
verify)
    pattern "$mib"
    want=$(sum /tmp/pattern)
    got=$(disk_sum)
    if [ "$want" = "$got" ]; then ok=yes; else ok=no; fi
    say "VERIFY sha256=$got want=$want ok=$ok"
    finish 0 ;;
trim)
    # DISCARD (BLKDISCARD) of the pattern's second MiB: the door's trim makes it read zeros.
    if ! blkdiscard -o 1048576 -l 1048576 /dev/vda; then say "ERROR discard failed"; finish 1; fi
    say "TRIM sha256=$(disk_sum)"
    finish 0 ;;
writeloop)
    # `writers` loops at once (chunks j, j + writers, ... for writer j, in slots of their
    # own), so up to `writers` requests are in flight together on the ring.
    slots=$((mib * 16))
    say "LOOP slots=$slots chunk=65536 writers=$writers"
    writer() {  # writer J
        n=$1
        while [ "$count" = 0 ] || [ $n -lt "$count" ]; do
            chunk $n /tmp/chunk.$1
            echo "WRITING $n"   # the host may SIGKILL the back end now, with this chunk in flight
            if ! dd if=/tmp/chunk.$1 of=/dev/vda bs=65536 seek=$((n % slots)) count=1 \
                    oflag=direct conv=fsync,notrunc status=none; then
                say "ERROR chunk $n failed"; return 1
            fi
            echo "ACKED $n"
            n=$((n + writers))
        done
    }
    j=0; pids=""
    while [ $j -lt "$writers" ]; do writer $j & pids="$pids $!"; j=$((j + 1)); done
    rc=0
    for p in $pids; do wait $p || rc=1; done
    finish $rc ;;
*)
    say "ERROR unknown job $job"; finish 2 ;;
esac
