"""Test support: the Kubernetes API emulator (kmock_server), the pod runner (Job controller + kubelet as local
processes), S3 servers (s3), and the pytest fixtures/helpers that tie them together (cluster)."""
