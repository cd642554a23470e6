"""Deployments of the serving side beyond one machine: Kubernetes manifests and the image they run."""
