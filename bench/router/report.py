#!/usr/bin/env python3
"""Prints the benchmark results (results.jsonl from run.sh, optionally cpu.jsonl from
cpu.sh) as Markdown tables. Usage: report.py RESULTS [CPU]"""
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
sizes = sorted({r["tenants"] for r in rows if "tenants" in r})
fmt = lambda v: f"{v:.0f}" if isinstance(v, (int, float)) else str(v)
print("| tenants | wrk rps direct | wrk rps nginx (median; rounds) | wrk rps router (median; rounds) | router/nginx | load avg during wrk | router RSS MB (loaded / after traffic) | table load s |")
print("|---|---|---|---|---|---|---|---|")
for n in sizes:
    g = lambda m, t=None: [r for r in rows if r.get("tenants") == n and r["metric"] == m and (t is None or r.get("target") == t)]
    rps = {t: (g("wrk_rps", t) or [{"value": 0}])[0]["value"] for t in ("direct", "nginx", "router")}
    rounds = {t: [r["value"] for r in g("wrk_rps_round", t)] for t in ("nginx", "router")}
    loads = [r["load1"] for r in g("wrk_rps_round") if "load1" in r]
    rss = (g("router_rss_mb") or [{"value": "?"}])[0]["value"]
    rss_after = (g("router_rss_after_traffic_mb") or [{"value": "?"}])[0]["value"]
    load = (g("router_table_load_s") or [{"value": "?"}])[0]["value"]
    ratio = round(float(rps["router"]) / float(rps["nginx"]), 2) if float(rps["nginx"]) else 0
    rr = lambda t: f"{fmt(rps[t])}; " + "/".join(fmt(v) for v in rounds[t]) if rounds[t] else fmt(rps[t])
    lr = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"
    print(f"| {n} | {fmt(rps['direct'])} | {rr('nginx')} | {rr('router')} | {ratio} | {lr} | {rss} / {rss_after} | {load} |")
print()
print("| tenants | rate | rounds | added p50 ms nginx | added p50 ms router | added p99 ms nginx (median; rounds) | added p99 ms router (median; rounds) |")
print("|---|---|---|---|---|---|---|")
for n in sizes:
    fr = [r for r in rows if r.get("tenants") == n and r["metric"] == "fixed_rate"]
    for rate in sorted({r["result"]["rate"] for r in fr}):
        at = [r for r in fr if r["result"]["rate"] == rate]
        res = {t: [r["result"] for r in at if r["target"] == t] for t in ("direct", "nginx", "router")}
        if not res["direct"]:
            continue
        med = lambda t, q: statistics.median(x[q] for x in res[t]) if res[t] else float("nan")
        add = lambda t, q: round(med(t, q) - med("direct", q), 3)
        # Per round: the proxy's percentile minus direct's in the same round.
        per = lambda t: "/".join(f"{a['p99_ms'] - d['p99_ms']:.3f}" for a, d in zip(res[t], res["direct"]))
        print(f"| {n} | {int(rate)} | {len(res['direct'])} | {add('nginx','p50_ms')} | {add('router','p50_ms')} | "
              f"{add('nginx','p99_ms')}; {per('nginx')} | {add('router','p99_ms')}; {per('router')} |")
for r in rows:
    if r["metric"] == "propagation_ms":
        print(f"\nRoute-update propagation over {r['updates']} updates: p50 {r['p50']} ms, p99 {r['p99']} ms, max {r['max']} ms")
if len(sys.argv) > 2:
    cpu = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
    print("\n| tenants | rate | CPU µs/request nginx (median; rounds) | CPU µs/request router (median; rounds) | router/nginx | load avg |")
    print("|---|---|---|---|---|---|")
    for key in sorted({(r["tenants"], r["rate"]) for r in cpu}):
        rs = [r for r in cpu if (r["tenants"], r["rate"]) == key and r["metric"] == "cpu_us_per_req"]
        v = {t: [r["value"] for r in rs if r["target"] == t] for t in ("nginx", "router")}
        if not v["nginx"] or not v["router"]:
            continue
        m = {t: statistics.median(v[t]) for t in v}
        loads = [r["load1"] for r in rs]
        print(f"| {key[0]} | {key[1]} | {m['nginx']:.1f}; " + "/".join(f"{x:.1f}" for x in v["nginx"])
              + f" | {m['router']:.1f}; " + "/".join(f"{x:.1f}" for x in v["router"])
              + f" | {m['router'] / m['nginx']:.2f} | {min(loads):.1f}-{max(loads):.1f} |")
