"""Misspelt settings variables (stream_lstm/environment.py)."""

from stream_lstm.environment import cpu_quota, unknown_variables, usable_cpus


def test_misspelt_variables_are_named():
    env = {"STREAM_LSTM_WINDOWS": "32", "stream_lstm_horizon": "6", "STREAM_LSTM_CACHE_DIR": "/c",
           "STREAM_LSTM_WINDOW": "32", "PATH": "/bin"}
    assert unknown_variables(env) == ["STREAM_LSTM_WINDOWS"]


def cgroup(tmp_path, own: str, files: dict[str, str]):
    """A cgroup mount under ``tmp_path`` holding ``files``, and a /proc/self/cgroup of ``own``."""
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "self").write_text(own)
    return tmp_path / "fs", tmp_path / "self"


def test_a_cpu_limit_caps_the_usable_cores_rounded_up(tmp_path):
    """PROCESSES=auto in a pod limited to 1.5 CPUs on a bigger node: 2 processes, not one a
    core of the node (cgroup v2, as the container sees its own cgroup at the root)."""
    import os

    cpus = len(os.sched_getaffinity(0))
    root, own = cgroup(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cpu_quota(root, own) == 1.5
    assert usable_cpus(root, own) == min(cpus, 2)
    root, own = cgroup(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})
    assert cpu_quota(root, own) is None and usable_cpus(root, own) == cpus


def test_the_least_quota_of_the_cgroup_and_its_ancestors_counts_v1_and_v2(tmp_path):
    root, own = cgroup(tmp_path / "v2", "0::/kubepods/pod1/ctr\n", {
        "kubepods/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "50000 100000",
        "kubepods/pod1/ctr/cpu.max": "max 100000"})
    assert cpu_quota(root, own) == 0.5
    assert usable_cpus(root, own) == 1  # (never none)
    root, own = cgroup(tmp_path / "v1", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cpu_quota(root, own) == 3.0
    root, own = cgroup(tmp_path / "nofile", "0::/\n", {})
    assert cpu_quota(root, own) is None
    root, own = cgroup(tmp_path / "odd", "\n0::/\n", {"cpu.max": "100000 0"})  # (never crash a start)
    assert cpu_quota(root, own) is None
    assert cpu_quota(root, tmp_path / "no-such-proc-file") is None
