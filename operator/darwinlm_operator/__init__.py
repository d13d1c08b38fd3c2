"""darwinlm_operator: the kopf operator for PruningSearch resources (darwinlm.io/v1alpha1).

It turns the library's plan (``darwinlm.core.plan.next_tasks``) into Kubernetes Jobs, mirrors progress into
the resource's status and exports Prometheus metrics. It never imports torch: it reads only the spec,
the plan and the store.
"""
