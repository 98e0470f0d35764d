"""docker-compose.yml, the Kubernetes manifests and the Dockerfile parse and match the settings.

The Grafana dashboard and the Prometheus files have their own tests (test_dashboards.py,
test_prometheus.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from stream_lstm.config import CHECKPOINT_S_PER_DEVICE, Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
ENV_RE = re.compile(r"\bSTREAM_LSTM_[A-Z0-9_]+")
PORT = Settings().metrics_port


def settings_vars() -> set[str]:
    return {f"STREAM_LSTM_{n.upper()}" for n in Settings.model_fields}


def k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(K8S.rglob("*.yaml")):
        out += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", [])


def test_every_stream_lstm_variable_is_a_setting():
    real = settings_vars()
    for f in [COMPOSE, DOCKERFILE, *sorted(K8S.rglob("*.yaml"))]:
        used = set(ENV_RE.findall(f.read_text()))
        assert used <= real, f"{f.relative_to(REPO)}: not settings: {sorted(used - real)}"


def test_compose_stack():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"kafka", "kafka-init", "simulator", "worker", "trainer", "prometheus", "grafana"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert services["kafka-init"]["image"] == kafka["image"]
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "healthcheck" in kafka
    init = "\n".join(services["kafka-init"]["command"])
    assert "/opt/kafka/bin/kafka-topics.sh" in init
    for topic in ("sensor-readings", "sensor-forecasts", "sensor-readings-dlq"):
        assert topic in init
    # The changelog and the models topic: created by the worker and the trainer, with their
    # full configs (not a compacted topic of 4 partitions, where a model keyed "model" landed
    # on a partition no worker reads).
    assert "stream-lstm-state-changelog" not in init and "stream-lstm-models" not in init
    for name in ("simulator", "worker", "trainer"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        assert svc["environment"]["STREAM_LSTM_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert services["simulator"]["command"] == ["simulate", "--devices", "200", "--rate", "200"]
    worker = services["worker"]
    assert worker["command"] == ["run"]
    assert f"{PORT}:{PORT}" in worker["ports"]
    assert int(worker["environment"]["STREAM_LSTM_METRICS_PORT"]) == PORT
    assert f"127.0.0.1:{PORT}/readyz" in " ".join(worker["healthcheck"]["test"])
    assert services["trainer"]["command"] == ["trainer"]
    prom = services["prometheus"]
    assert any(v.startswith("./deploy/prometheus:/etc/prometheus") for v in prom["volumes"])
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    # The devices' alerts reach the stack's Alertmanager through the relay, the rules' directly.
    relay, am = services["alert-relay"], services["alertmanager"]
    assert relay["command"] == ["alert-relay"]
    assert relay["environment"]["STREAM_LSTM_ALERTS_TOPIC"] in init
    assert relay["environment"]["STREAM_LSTM_ALERTMANAGER_URL"] == "http://alertmanager:9093"
    assert "9093:9093" in am["ports"] and any(v.startswith("./deploy/alertmanager:/etc/alertmanager") for v in am["volumes"])
    routes = yaml.safe_load((REPO / "deploy/alertmanager/alertmanager.yml").read_text())
    names = {r["name"] for r in routes["receivers"]}
    assert routes["route"]["receiver"] in names and all(r["receiver"] in names for r in routes["route"]["routes"])
    prom_cfg = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    assert prom_cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_prometheus_scrapes_the_compose_worker_on_the_metrics_port():
    cfg = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"worker:{PORT}" in targets
    assert cfg["rule_files"] == ["alerts.yml"]


def test_k8s_manifests_parse_and_wire_probes_to_the_metrics_port():
    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"StatefulSet", "Deployment", "ConfigMap", "Secret", "Service", "PodDisruptionBudget"} <= kinds
    for f, d in docs:
        assert "namespace" not in d["metadata"], f"{f.name}: manifests are namespace-free"
    config = next(d for _, d in docs if d["kind"] == "ConfigMap")["data"]
    assert int(config["STREAM_LSTM_METRICS_PORT"]) == PORT
    assert config["STREAM_LSTM_METRICS_HOST"] == "0.0.0.0"
    partitions = int(config["STREAM_LSTM_TOPIC_PARTITIONS"])
    assert "STREAM_LSTM_PROCESSES" not in config  # one worker process a pod: replicas scale
    sets = [(f, d) for f, d in docs if d["kind"] == "StatefulSet"]
    assert {f.name for f, _ in sets} == {"worker.yaml", "worker-gpu.yaml"}
    for f, d in sets:
        assert d["spec"]["replicas"] <= partitions, f.name
        (c,) = containers(d)
        assert c["args"] == ["run"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": PORT}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": PORT}
        assert {"containerPort": PORT, "name": "metrics"} in c["ports"]
        assert c["resources"]["requests"]["cpu"]
        instance = next(e for e in c["env"] if e["name"] == "STREAM_LSTM_INSTANCE_ID")
        assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        refs = [r.get("configMapRef", r.get("secretRef", {})).get("name") for r in c["envFrom"]]
        assert refs == ["stream-lstm", "stream-lstm-kafka"]
    # What `kubectl apply -f deploy/k8s/` applies (not recursive): one set of workers, and no
    # example Secret whose placeholder credentials would replace a working connection.
    applied = [(f, d) for f, d in docs if f.parent == K8S]
    assert [f.name for f, d in applied if d["kind"] == "StatefulSet"] == ["worker.yaml"]
    assert not [f for f, d in applied if d["kind"] == "Secret"]
    gpu = next(d for f, d in sets if f.name == "worker-gpu.yaml")
    (c,) = containers(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "cuda" in c["image"]
    trainer = next(d for f, d in docs if d["kind"] == "Deployment" and f.name == "trainer.yaml")
    (c,) = containers(trainer)
    assert c["args"] == ["trainer"] and trainer["spec"]["replicas"] == 1
    # Its endpoint starts after the model load and the connect: the liveness probe waits.
    assert c["startupProbe"]["httpGet"] == c["livenessProbe"]["httpGet"]
    # Its stop with the broker away may take 30 s (a publish in flight): more than the default.
    assert trainer["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 45
    # Its registry outlives the pod (the versions to roll back to).
    (volume,) = trainer["spec"]["template"]["spec"]["volumes"]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for _, d in docs)
    service = next(d for _, d in docs if d["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["port"] == PORT
    assert "HorizontalPodAutoscaler" in (K8S / "worker.yaml").read_text()  # the HPA notes
    relay = next(d for f, d in docs if f.name == "alert-relay.yaml")
    (c,) = containers(relay)
    assert c["args"][0] == "alert-relay"  # and the rest are the command's own arguments
    import argparse

    from stream_lstm.relay import service as relay_service

    parser = argparse.ArgumentParser()
    relay_service.add_arguments(parser)
    assert relay_service.parse_labels(parser.parse_args(c["args"][1:]).label)["severity"]
    assert any(e["name"] == "STREAM_LSTM_ALERTMANAGER_URL" for e in c["env"])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": PORT}


def test_scraped_pods_carry_the_job_names_the_alert_rules_use():
    """The rules and the dashboard select jobs by name; the pods said nothing of them, so under
    the usual annotation-based scrape four critical alerts could never fire."""
    rules = (REPO / "deploy" / "prometheus" / "alerts.yml").read_text()
    named = set(re.findall(r"stream-lstm-[a-z-]+", rules))
    assert named == {"stream-lstm-worker", "stream-lstm-trainer", "stream-lstm-alert-relay"}
    scraped = {f.name: d["spec"]["template"]["metadata"] for f, d in k8s_docs()
               if d["kind"] in ("StatefulSet", "Deployment")}
    assert set(scraped) == {"worker.yaml", "worker-gpu.yaml", "trainer.yaml", "alert-relay.yaml"}
    jobs = {f: m["labels"]["app.kubernetes.io/name"] for f, m in scraped.items()}
    assert set(jobs.values()) == named and jobs["worker-gpu.yaml"] == "stream-lstm-worker"
    assert all(m["annotations"]["prometheus.io/scrape"] == "true" for m in scraped.values())
    (monitor,) = [d for _, d in k8s_docs() if d["kind"] == "PodMonitor"]
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert all(monitor["spec"]["selector"]["matchLabels"].items() <= m["labels"].items() for m in scraped.values())


def test_every_pod_meets_the_restricted_pod_security_standard():
    """Kubernetes' "restricted" Pod Security admission refused the trainer, the GPU worker and
    the relay (no seccomp profile; capabilities and privilege escalation left as they were)."""
    for f, d in k8s_docs():
        if d["kind"] not in ("StatefulSet", "Deployment"):
            continue
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, f.name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, f.name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, f.name
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, f.name


def test_dockerfile_exposes_the_metrics_port_and_runs_the_cli():
    text = DOCKERFILE.read_text()
    assert f"EXPOSE {PORT}" in text
    assert "STREAM_LSTM_METRICS_HOST=0.0.0.0" in text
    assert f"STREAM_LSTM_METRICS_PORT={PORT}" in text
    assert 'ENTRYPOINT ["stream-lstm"]' in text and 'CMD ["run"]' in text
    assert re.search(r"^USER (?!root|0\b)", text, re.M), "the image must not run as root"
    assert "ARG BASE=cpu" in text and "download.pytorch.org/whl/cpu" in text
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3, "multi-stage build expected"


def test_the_package_reads_and_writes_every_codec_the_settings_offer():
    """The README and the configmap suggest zstd, which needed a package the image lacked: a
    pod set to it exited 2 at start, restarted for ever. And any producer of the input may
    compress with any of Kafka's codecs: a batch the client cannot decompress stopped its
    partition (before kafka/unreadable.py: the worker). Their packages are dependencies."""
    import tomllib
    from typing import get_args

    from stream_lstm.config import Settings

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    packages = {re.split(r"[<>=\[ ]", r)[0] for r in deps}
    offered = set(get_args(Settings.model_fields["compression_type"].annotation)) - {"none", "gzip"}
    needs = {"zstd": "zstandard", "lz4": "lz4", "snappy": "python-snappy"}  # (kafka-python's codec packages)
    assert offered == needs.keys() and set(needs.values()) <= packages
    assert re.search(r'^RUN pip install "\$\(echo /tmp/\*\.whl\)"', DOCKERFILE.read_text(), re.M)


def test_each_workers_grace_period_covers_the_checkpoints_of_a_clean_stop():
    """The GPU worker (1M devices) had 60 s for a stop that checkpoints every changed device at
    about 0.25 ms each (measured by a review: 260k devices, 56 s): killed mid-stop, it rebuilt
    its local store from the changelog at every rollout."""
    config = next(d for _, d in k8s_docs() if d["kind"] == "ConfigMap")["data"]
    for f, d in k8s_docs():
        if d["kind"] != "StatefulSet":
            continue
        (c,) = containers(d)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        devices = int(env.get("STREAM_LSTM_MAX_DEVICES") or config["STREAM_LSTM_MAX_DEVICES"])
        grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= devices * CHECKPOINT_S_PER_DEVICE + 15, (f.name, devices, grace)


def test_the_images_build_stage_makes_a_wheel_with_the_kafka_pom(tmp_path):
    """The build stage copied stream_lstm/ but not what its kafka/pom.xml links to: the link
    dangled and the image's `stream-lstm kafka up` had no jars to fetch. The stage's own COPY
    lines are replayed here, and the wheel built from what they copy."""
    import shutil
    import subprocess
    import sys
    import zipfile

    build = DOCKERFILE.read_text().split("AS build", 1)[1].split("\nFROM ", 1)[0]
    copies = re.findall(r"^COPY (?!--from)(.+) (\S+)$", build, re.M)
    assert copies, build
    for sources, dest in copies:
        for source in sources.split():
            target = tmp_path / dest / (Path(source).name if dest.endswith("/") else "")
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, symlinks=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / source, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert "stream_lstm/kafka/pom.xml" in zipfile.ZipFile(wheel).namelist()


def test_the_compose_broker_keeps_its_log_on_its_volume():
    """apache/kafka writes to /tmp/kraft-combined-logs unless told: recreated, the broker lost
    the changelog, the models topic and the offsets, while the workers kept their stores."""
    kafka = yaml.safe_load(COMPOSE.read_text())["services"]["kafka"]
    (volume,) = kafka["volumes"]
    assert kafka["environment"]["KAFKA_LOG_DIRS"] == volume.split(":")[1]


def _seconds(duration: str) -> float:
    """A compose duration ("60s", "1m30s", "2m") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(duration))
    assert parts and any(parts.groups()), duration
    return 60 * int(parts[1] or 0) + float(parts[2] or 0)


def test_compose_stop_grace_matches_the_kubernetes_termination_grace():
    """The compose trainer had Docker's default 10 s: a trainer stopped while the broker does not
    answer took 34 s to stop (a review: the broker paused with SIGSTOP, then SIGTERM, timed), the reason its
    Deployment has 60 s, and was killed. Each long-lived service gets what its manifest gives."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    grace = {}
    for f, d in k8s_docs():
        if d["kind"] in ("StatefulSet", "Deployment") and f.parent == K8S:
            (c,) = containers(d)
            grace[c["args"][0]] = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert set(grace) == {"run", "trainer"}
    for name, svc in services.items():
        command = (svc.get("command") or [None])[0]
        if command in grace:
            assert _seconds(svc.get("stop_grace_period", "10s")) >= grace[command], (name, grace[command])
