"""Kubernetes pods for tests, through containerd's own CRI plugin and without a kubelet.

- api.proto: a hand-written subset of the CRI (k8s.io/cri-api runtime.v1, v0.25's field numbers);
  api_pb2*.py are generated from it by compile.py (`python -m tests.cri.compile`) and checked in;
  tests/unit/test_cri_protos.py fails when they drift or a field number is wrong.
- client.py: `CriClient`, the kubelet's side of the CRI over containerd's unix socket, and `stream`, a
  WebSocket client of CRI's streaming server for Exec and Attach (v4.channel.k8s.io).
- env.py: `CriContainerd`, a private containerd with CRI on, its own CNI network, cgroup parent and
  images (busybox and a pause image built here), with the runtime handlers "runc" and "uvm".

    with CriContainerd() as env:
        pod_config = env.pod_config("web")
        pod = env.cri.run_pod(pod_config, "runc").pod_sandbox_id
        cid = env.cri.create_container(pod, container_config("c", ["sleep", "60"], pod=pod_config), pod_config).container_id
        env.cri.start_container(cid)
        out, err, code = stream(env.cri.exec_url(cid, ["sh", "-c", "head -n 1"], stdin=True), stdin=b"hi\\n")
"""
