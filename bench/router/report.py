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
print("| tenants | rate | added p50 ms nginx | added p50 ms router | added p99 ms nginx | added p99 ms router |")
print("|---|---|---|---|---|---|")
for n in sizes:
    fr = [r for r in rows if r.get("tenants") == n and r["metric"] == "fixed_rate"]
    for rate in sorted({r["result"]["rate"] for r in fr}):
        res = {r["target"]: r["result"] for r in fr if r["result"]["rate"] == rate}
        if "direct" not in res:
            continue
        d = res["direct"]
        add = lambda t, q: round(res[t][q] - d[q], 3) if t in res else "?"
        print(f"| {n} | {int(rate)} | {add('nginx','p50_ms')} | {add('router','p50_ms')} | {add('nginx','p99_ms')} | {add('router','p99_ms')} |")
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
