"""Helpers of scripts/openstack.sh, run with the control plane's venv inside its namespace.

    helper.py wait-http URL TIMEOUT [PID]      until URL answers (any HTTP status < 500)
    helper.py probe-http URL                   one try: "answers HTTP 200" or "no answer: ..."
    helper.py wait-amqp URL TIMEOUT            until an AMQP login to URL succeeds
    helper.py probe-amqp URL
    helper.py wait-nova-services DB HOST TIMEOUT PID...
                                               until nova-conductor and nova-scheduler of HOST
                                               are registered in cell1's services table
    helper.py probe-nova-service DB HOST BINARY
    helper.py wait-nova-compute DB HOST TIMEOUT [PID...]
                                               until HOST's nova-compute is registered, enabled
                                               and reported within the last 60 s
    helper.py wait-providers PLACEMENT_DB NAME,... TIMEOUT
                                               until Placement has those resource providers
    helper.py register                         Keystone: the service project, the service users
                                               (admin role in it), services and endpoints of
                                               glance, placement, nova and neutron (the env
                                               names addresses, ports and passwords)

A PID given to a wait is the service's: its death ends the wait at once.
"""

import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def _alive(pids):
    for pid in pids:
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            pass
    return True


def probe_http(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return True, f"answers HTTP {r.status}"
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return True, f"answers HTTP {e.code}"
        return False, f"no answer: HTTP {e.code}"
    except Exception as e:  # noqa: BLE001 - any failure means "not yet"
        return False, f"no answer: {e}"


def probe_amqp(url):
    import amqp

    u = urllib.parse.urlparse(url)
    try:
        c = amqp.Connection(
            host=f"{u.hostname}:{u.port or 5672}",
            userid=urllib.parse.unquote(u.username or "guest"),
            password=urllib.parse.unquote(u.password or "guest"),
            virtual_host=urllib.parse.unquote(u.path[1:]) or "/",
            connect_timeout=3,
        )
        c.connect()
        version = c.server_properties.get("version", "?")
        c.close()
        return True, f"answers AMQP (RabbitMQ {version})"
    except Exception as e:  # noqa: BLE001
        return False, f"no answer: {e}"


def _connect(db):
    import pymysql

    u = urllib.parse.urlparse(db.replace("mysql+pymysql://", "mysql://"))
    return pymysql.connect(
        host=u.hostname,
        port=u.port or 3306,
        user=urllib.parse.unquote(u.username),
        password=urllib.parse.unquote(u.password),
        database=u.path.lstrip("/").split("?")[0],
        connect_timeout=3,
    )


def _nova_services(db, host):
    conn = _connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT `binary`, disabled, TIMESTAMPDIFF(SECOND, COALESCE(updated_at, created_at),"
                " UTC_TIMESTAMP()) FROM services WHERE host = %s AND deleted = 0",
                (host,),
            )
            return {b: (bool(d), age) for b, d, age in cur.fetchall()}
    finally:
        conn.close()


def wait(probe, args, timeout, pids):
    deadline = time.monotonic() + timeout
    msg = ""
    while time.monotonic() < deadline:
        ok, msg = probe(*args)
        if ok:
            return 0
        if pids and not _alive(pids):
            print(f"helper: the service exited ({msg})", file=sys.stderr)
            return 1
        time.sleep(0.3)
    print(f"helper: timed out after {timeout} s ({msg})", file=sys.stderr)
    return 1


def wanted_services(db, host):
    try:
        got = _nova_services(db, host)
    except Exception as e:  # noqa: BLE001
        return False, f"no answer: {e}"
    missing = [b for b in ("nova-conductor", "nova-scheduler") if b not in got]
    return (not missing), f"registered: {sorted(got)}; missing: {missing}"


def compute_up(db, host):
    try:
        got = _nova_services(db, host)
    except Exception as e:  # noqa: BLE001
        return False, f"no answer: {e}"
    if "nova-compute" not in got:
        return False, f"nova-compute of {host} not registered"
    disabled, age = got["nova-compute"]
    if disabled:
        return False, f"nova-compute of {host} is disabled"
    return age is not None and age <= 60, f"nova-compute of {host}: last report {age} s ago"


def providers_present(db, names):
    want = set(names.split(","))
    try:
        conn = _connect(db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT name FROM resource_providers")
                have = {r[0] for r in cur.fetchall()}
        finally:
            conn.close()
    except Exception as e:  # noqa: BLE001
        return False, f"no answer: {e}"
    missing = sorted(want - have)
    return not missing, f"resource providers missing: {missing}"


def register():
    from keystoneauth1 import session
    from keystoneauth1.identity import v3
    from keystoneclient.v3 import client

    e = os.environ
    a = e["ADDR"]
    region = e["REGION"]
    auth = v3.Password(
        auth_url=f"http://{a}:{e['P_KEYSTONE']}/v3",
        username="admin",
        password=e["ADMIN_PASS"],
        project_name="admin",
        user_domain_id="default",
        project_domain_id="default",
    )
    ks = client.Client(session=session.Session(auth=auth), interface="public")
    domain = ks.domains.get("default")
    projects = {p.name: p for p in ks.projects.list(domain=domain)}
    service_project = projects.get("service") or ks.projects.create(
        "service", domain, description="OpenStack services"
    )
    admin_role = ks.roles.find(name="admin")
    # service roles for the service users too, as deployments do (Nova 34's policies
    # accept the service role for service-to-service calls).
    roles = {r.name: r for r in ks.roles.list()}
    service_role = roles.get("service") or ks.roles.create("service")
    services = [
        # user, its password, service name, type, description, URL
        ("glance", e["KS_GLANCE_PASS"], "glance", "image", "OpenStack Image", f"http://{a}:{e['P_GLANCE']}"),
        ("placement", e["KS_PLACEMENT_PASS"], "placement", "placement", "Placement API", f"http://{a}:{e['P_PLACEMENT']}"),
        ("nova", e["KS_NOVA_PASS"], "nova", "compute", "OpenStack Compute", f"http://{a}:{e['P_NOVA']}/v2.1"),
        ("neutron", e["KS_NEUTRON_PASS"], "neutron", "network", e["NEUTRON_DESC"], f"http://{a}:{e['P_NEUTRON']}"),
    ]
    users = {u.name: u for u in ks.users.list(domain=domain)}
    existing = {s.type: s for s in ks.services.list()}
    for user, password, name, stype, desc, url in services:
        u = users.get(user) or ks.users.create(user, domain=domain, password=password)
        ks.roles.grant(admin_role, user=u, project=service_project)
        ks.roles.grant(service_role, user=u, project=service_project)
        svc = existing.get(stype) or ks.services.create(name, type=stype, description=desc)
        have = {ep.interface for ep in ks.endpoints.list(service=svc, region=region)}
        for interface in ("public", "internal", "admin"):
            if interface not in have:
                ks.endpoints.create(svc, url, interface=interface, region=region)
        print(f"registered {name} ({stype}) at {url}, user {user}")
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "wait-http":
        return wait(lambda u: probe_http(u), [args[0]], float(args[1]), args[2:])
    if cmd == "probe-http":
        print(probe_http(args[0])[1])
        return 0
    if cmd == "wait-amqp":
        return wait(probe_amqp, [args[0]], float(args[1]), args[2:])
    if cmd == "probe-amqp":
        print(probe_amqp(args[0])[1])
        return 0
    if cmd == "wait-nova-services":
        return wait(wanted_services, [args[0], args[1]], float(args[2]), args[3:])
    if cmd == "wait-nova-compute":
        return wait(compute_up, [args[0], args[1]], float(args[2]), args[3:])
    if cmd == "wait-providers":
        return wait(providers_present, [args[0], args[1]], float(args[2]), [])
    if cmd == "probe-nova-service":
        db, host, binary = args
        try:
            got = _nova_services(db, host)
        except Exception as e:  # noqa: BLE001
            print(f"no answer: {e}")
            return 0
        if binary not in got:
            print("not registered")
        else:
            disabled, age = got[binary]
            state = "up" if age is not None and age <= 60 else "down"
            print(f"registered, {state} (last report {age} s ago){', disabled' if disabled else ''}")
        return 0
    if cmd == "register":
        return register()
    print(f"helper: unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
