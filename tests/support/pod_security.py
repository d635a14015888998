"""The Pod Security Standards "baseline" and "restricted", as checks on a pod spec.

What the API server's PodSecurity admission enforces for each level (``restricted``
includes ``baseline``), in the form a manifest can get wrong; Windows pods are out of
scope. See https://kubernetes.io/docs/concepts/security/pod-security-standards/.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Volume types the restricted profile allows (hostPath, among others, is not).
ALLOWED_VOLUMES = frozenset({
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
})
ADDABLE_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
# Capabilities baseline lets a container add (the container runtimes' default set).
BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
})
SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t",
                           "container_engine_t"})


def pod_spec_of(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod spec of a Pod, or of a workload's pod template."""
    if manifest["kind"] == "Pod":
        return manifest["spec"]
    if manifest["kind"] == "CronJob":
        return manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return manifest["spec"]["template"]["spec"]


def _containers(pod: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod.get(key) or []:
            yield f"{key}[{container.get('name')}]", container


def baseline_violations(pod: Mapping[str, Any]) -> list[str]:
    """Every way ``pod`` (a pod spec) falls short of "baseline"; empty when it passes.

    Baseline forbids the known privilege escalations (host namespaces, host paths and
    ports, privileged containers, added capabilities beyond the runtime's defaults);
    a pod that fails it is admitted only where the namespace enforces "privileged".
    """
    found: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"spec.{field} must be unset or false")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            found.append(f"volume {volume.get('name')}: hostPath volumes are forbidden")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"spec.securityContext.sysctls: {sysctl.get('name')} is not safe")
    found += _identity_violations("spec.securityContext", pod_sc)
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append("spec.securityContext.seccompProfile.type must not be Unconfined")
    for where, container in _containers(pod):
        sc = container.get("securityContext") or {}
        found += _identity_violations(f"{where}.securityContext", sc)
        if sc.get("privileged"):
            found.append(f"{where}: privileged must be unset or false")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount must be Default")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}: seccompProfile.type must not be Unconfined")
        added = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if added:
            found.append(f"{where}: capabilities.add beyond the defaults: {sorted(added)}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{where}: hostPort {port['hostPort']} is not allowed")
    return found


def restricted_violations(pod: Mapping[str, Any]) -> list[str]:
    """Every way ``pod`` (a pod spec) falls short of "restricted"; empty when it passes.

    Each entry names the field and what is wrong, so a failing assert says what to fix.
    """
    found = baseline_violations(pod)
    pod_sc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            found.append(f"volume {volume.get('name')}: type {sorted(kinds)} is not allowed")
    if pod_sc.get("runAsUser") == 0:
        found.append("spec.securityContext.runAsUser must not be 0")
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_TYPES:
        found.append("spec.securityContext.seccompProfile.type must be RuntimeDefault or Localhost")
    for where, container in _containers(pod):
        sc = container.get("securityContext") or {}
        if sc.get("runAsUser") == 0:
            found.append(f"{where}.securityContext.runAsUser must not be 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot")):
            found.append(f"{where}: runAsNonRoot must be true (here or for the pod)")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp not in SECCOMP_TYPES and not (seccomp is None and pod_seccomp in SECCOMP_TYPES):
            found.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost "
                         "(here or for the pod)")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{where}: capabilities.drop must include ALL")
        added = set(capabilities.get("add") or []) - ADDABLE_CAPABILITIES
        if added:
            found.append(f"{where}: capabilities.add may hold only NET_BIND_SERVICE, not "
                         f"{sorted(added)}")
    return found


def _identity_violations(where: str, sc: Mapping[str, Any]) -> list[str]:
    """SELinux or AppArmor settings that the baseline forbids."""
    found = []
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES:
        found.append(f"{where}.seLinuxOptions.type {selinux['type']!r} is not allowed")
    if selinux.get("user") or selinux.get("role"):
        found.append(f"{where}.seLinuxOptions user and role must be unset")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"{where}.appArmorProfile.type must be RuntimeDefault or Localhost")
    return found
