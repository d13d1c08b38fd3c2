"""Tests of the PruningSearch CRD: generated, valid for Kubernetes, and as strict as the operator."""
