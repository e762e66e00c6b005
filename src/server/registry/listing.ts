/** GET /v2/<name>/tags/list and GET /v2/_catalog, from the catalog, with n/last pagination. */
import type { FastifyReply, FastifyRequest } from "fastify";
import { queryParam, type RegistryContext } from "./context.js";
import { RegistryError } from "./errors.js";
import { type RepoName, repoPath } from "./names.js";

export async function listTags(
  ctx: RegistryContext,
  repo: RepoName,
  req: FastifyRequest,
  reply: FastifyReply,
): Promise<FastifyReply> {
  const rows = ctx.store.catalog.list().filter((r) => r.repository === repo.name);
  if (rows.length === 0) {
    throw new RegistryError("NAME_UNKNOWN", `repository ${repo.path} is not known`, {
      detail: { name: repo.path },
    });
  }
  const tags = [...new Set(rows.flatMap((r) => (r.tag === null ? [] : [r.tag])))].sort();
  const page = paginate(tags, req, `/v2/${repo.path}/tags/list`, reply);
  return reply.code(200).send({ name: repo.path, tags: page });
}

export async function listRepositories(
  ctx: RegistryContext,
  req: FastifyRequest,
  reply: FastifyReply,
): Promise<FastifyReply> {
  const names = new Set<string>();
  for (const r of ctx.store.catalog.list()) if (r.repository !== null) names.add(repoPath(r.repository));
  const page = paginate([...names].sort(), req, "/v2/_catalog", reply);
  return reply.code(200).send({ repositories: page });
}

/** Entries after `last`, at most `n`; a Link header names the next page when there is one. */
function paginate(sorted: string[], req: FastifyRequest, path: string, reply: FastifyReply): string[] {
  const last = queryParam(req, "last");
  const nText = queryParam(req, "n");
  let n: number | undefined;
  if (nText !== undefined && nText !== "") {
    if (!/^\d+$/.test(nText)) {
      throw new RegistryError("PAGINATION_NUMBER_INVALID", `invalid page size n=${nText}`);
    }
    n = Number(nText);
  }
  const after = last === undefined || last === "" ? sorted : sorted.filter((s) => s > last);
  if (n === undefined || after.length <= n) return after;
  const page = after.slice(0, n);
  if (page.length > 0) {
    const next = `${path}?n=${n}&last=${encodeURIComponent(page[page.length - 1]!)}`;
    reply.header("link", `<${next}>; rel="next"`);
  }
  return page;
}
