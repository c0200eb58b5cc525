#!/usr/bin/env python3
# Usage: .ci/import-circles.py vmm/src vhost-blk-backend/src vmctl/src
# Import circles between a crate's modules, module by module (each file is
# one): an edge from a file to the module each `crate::a::b...` path in it
# (outside its tests) names, resolved to the deepest module file that exists;
# `super::x` resolved the same way from the file's parent. Prints every
# strongly connected component of more than one module.
import os, re, sys
def modpath(src, f):
    rel = os.path.relpath(f, src).removesuffix('.rs').split('/')
    if rel[-1] == 'mod': rel = rel[:-1]
    if rel in (['main'], ['lib']): rel = []
    return tuple(rel)
def collect(src):
    files = {}
    for root, _, fs in os.walk(src):
        for f in fs:
            if f.endswith('.rs'):
                p = os.path.join(root, f); files[modpath(src, p)] = p
    return files
def resolve(files, parts):
    parts = tuple(parts)
    for n in range(len(parts), 0, -1):
        if parts[:n] in files: return parts[:n]
    return None
def edges(files):
    e = {m: set() for m in files}
    for m, p in files.items():
        text = re.split(r'#\[cfg\(test\)\]\s*mod ', open(p).read())[0]
        text = re.sub(r'//[^\n]*', '', text)
        paths = re.findall(r'crate((?:::\w+)+)', text)
        for g in re.findall(r'crate::\{([^}]*)\}', text):
            paths += ['::' + x.strip().replace(' ', '') for x in g.split(',') if x.strip()]
        for path in paths:
            t = resolve(files, [x for x in path.split('::') if x])
            if t is not None and t != m and t != (): e[m].add(t)
        for path in re.findall(r'super((?:::\w+)+)', text):
            base = m[:-1] if os.path.basename(p) != 'mod.rs' else m[:-1]
            t = resolve(files, list(base) + [x for x in path.split('::') if x])
            if t is not None and t != m and t != (): e[m].add(t)
    return e
def sccs(e):
    index, low, stack, on, out, i = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
        for w in e[v]:
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            c = []
            while True:
                w = stack.pop(); on.discard(w); c.append(w)
                if w == v: break
            if len(c) > 1: out.append(sorted('::'.join(x) for x in c))
    sys.setrecursionlimit(10000)
    for v in e:
        if v not in index: visit(v)
    return out
for crate in sys.argv[1:]:
    c = sccs(edges(collect(crate)))
    print(f"{crate}: {len(c)} circle(s)" + ''.join(f"\n  {x}" for x in c))
