"""The model repository as a deployment: a Dockerfile and Kubernetes manifests, written beside the model.

The image is NVIDIA's tritonserver (its Python backend runs the loop model) of a stated release, with trm-export's
runtime installed from the wheel the bundle carries, and the repository copied in. The manifests follow how NVIDIA
documents Triton on Kubernetes: a Deployment of that image with readiness and liveness on /v2/health/ready and
/v2/health/live, the metrics port named for Prometheus to scrape, a Service for the three ports, and a
HorizontalPodAutoscaler on CPU. Both sit at the repository's top level as files (`Dockerfile`, `k8s.yaml`):
tritonserver takes every top-level folder for a model, so a `k8s/` folder there would stop it from starting.
Nothing here can be built or applied on the exporting machine (no container daemon, no cluster): the tests check
the Dockerfile statically and the manifests against Kubernetes' schemas offline (kubernetes-validate).
"""

from __future__ import annotations

import json
import re

# The release the model is tested with (triton_serving.server runs nvidia-pytriton's build of the same Triton).
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def dns_name(name: str) -> str:
    """`trm-NAME` as Kubernetes names must be (RFC 1123: lowercase letters, digits and '-', at most 63)."""
    return ("trm-" + re.sub(r"[^a-z0-9-]+", "-", name.lower())).strip("-")[:63].rstrip("-")


def image_name(name: str, digest: str) -> str:
    """The image's local name: the model and the bundle's manifest digest (retag it for your registry)."""
    return f"{dns_name(name)}-triton:{digest[:12]}"


def dockerfile(name: str, wheel: str | None) -> str:
    install = (f"/models/{name}/1/bundle/{wheel}" if wheel else "trm-export")
    return "\n".join([
        f"# Triton Inference Server serving the trm-export model repository `{name}` (see README.md).",
        "#   docker build -t IMAGE .",
        "#   docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -p 127.0.0.1:8002:8002 IMAGE",
        f"FROM {TRITON_IMAGE}",
        "COPY . /models",
        "# The runtime from the wheel the bundle carries (numpy < 2: this release's Python stub is built against 1.x).",
        f'RUN python3 -m pip install --no-cache-dir "numpy<2" {install}',
        f"EXPOSE {' '.join(str(p) for p in PORTS.values())}",
        "CMD " + json.dumps(["tritonserver", "--model-repository=/models", f"--http-port={PORTS['http']}",
                             f"--grpc-port={PORTS['grpc']}", f"--metrics-port={PORTS['metrics']}"]),
        ""])


def kubernetes(name: str, image: str, cpus: int = 2, memory_gib: int = 4) -> list[dict]:
    """Deployment, Service and HorizontalPodAutoscaler for the image (one pod holds `cpus` CPUs: the loop model's
    threads follow the container's quota)."""
    app = dns_name(name)
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/component": "triton"}
    probe = {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "tritonserver", "image": image,
        "ports": [{"name": key, "containerPort": port} for key, port in PORTS.items()],
        "resources": {"requests": {"cpu": str(cpus), "memory": f"{memory_gib // 2}Gi"},
                      "limits": {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}},
        "readinessProbe": probe, "startupProbe": {**probe, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": app, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels, "annotations": {
                     "prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"]),
                     "prometheus.io/path": "/metrics"}},
                     "spec": {"terminationGracePeriodSeconds": 30, "containers": [container]}}}}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": app, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": key, "port": port, "targetPort": key}
                                               for key, port in PORTS.items()]}}
    autoscaler = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": app, "labels": labels},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app},
                 "minReplicas": 1, "maxReplicas": 4,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                     "type": "Utilization", "averageUtilization": 70}}}]}}
    return [deployment, service, autoscaler]


def kubernetes_yaml(documents: list[dict]) -> str:
    """Multi-document YAML, JSON-flavoured (valid YAML 1.2; no YAML library on the runtime side)."""
    return "".join(f"---\n{json.dumps(doc, indent=2)}\n" for doc in documents)


def readme_section(name: str, image: str) -> str:
    return f"""## As an image, on Kubernetes

`Dockerfile` builds the image ({TRITON_IMAGE}, the runtime installed from the bundle's wheel, this repository in
`/models`); `k8s.yaml` deploys it: a Deployment (2 CPUs, readiness and liveness on `/v2/health/ready` and
`/v2/health/live`, the `metrics` port annotated for Prometheus), a Service for ports 8000 (HTTP), 8001 (gRPC) and
8002 (metrics), and a HorizontalPodAutoscaler on CPU (1-4 pods). Push the image where your cluster pulls from and
set its name in `k8s.yaml` (`{image}` as written):

```bash
docker build -t {image} .
docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -p 127.0.0.1:8002:8002 {image}
kubectl apply -f k8s.yaml
```

Neither was built or applied where this repository was written: the Dockerfile is checked statically and the
manifests against Kubernetes' schemas (offline) by trm-export's tests.
"""
