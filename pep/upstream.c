/*
 * upstream.c — building the upstream calls of an allowed request (see upstream.h).
 *
 * SECURITY: what the agent sent is copied only through forward_header_allowed (no
 * credential, cookie, hop-by-hop, framing, override or forwarding header) and never next
 * to a header the policy sets for the upstream; head_problem (http.c) has already refused
 * any control byte, so nothing copied here can end a line.
 */
#include "pep/upstream.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Collects the agent's headers that may travel upstream (forward_header_allowed). */
struct header_copy {
    struct upstream_request *u;
    char *connection_tokens; /* every Connection header's value, joined by commas */
    bool failed;
};

static enum MHD_Result copy_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                   const char *value) {
    (void)kind;
    struct header_copy *hc = cls;
    struct upstream_request *u = hc->u;
    if (!forward_header_allowed(key, hc->connection_tokens)) return MHD_YES;
    if (strlen(key) + (value ? strlen(value) : 0) + 3 > UPSTREAM_MAX_HEADER_LINE)
        return MHD_YES; /* an oversized header is not relayed */
    if (u->headers_len == u->headers_cap) {
        size_t cap = u->headers_cap ? u->headers_cap * 2 : 16;
        struct forward_header *g = realloc(u->headers, cap * sizeof *g);
        if (!g) {
            hc->failed = true;
            return MHD_NO;
        }
        u->headers = g;
        u->headers_cap = cap;
    }
    struct forward_header h = {strdup(key), strdup(value ? value : "")};
    if (!h.name || !h.value) {
        free(h.name);
        free(h.value);
        hc->failed = true;
        return MHD_NO;
    }
    u->headers[u->headers_len++] = h;
    return MHD_YES;
}

static enum MHD_Result join_connection(void *cls, enum MHD_ValueKind kind, const char *key,
                                       const char *value) {
    (void)kind;
    if (strcasecmp(key, "Connection") == 0 && value) {
        FILE *f = cls;
        fputs(value, f);
        fputc(',', f);
    }
    return MHD_YES;
}

/* SECURITY: every name listed in any Connection header is hop-by-hop (RFC 9110 7.6.1),
 * not only those of the first: *out is all their values joined by commas (malloc'd). */
static int connection_tokens(struct MHD_Connection *conn, char **out) {
    size_t len = 0;
    FILE *f = open_memstream(out, &len);
    if (!f) return PEP_ENOMEM;
    MHD_get_connection_values(conn, MHD_HEADER_KIND, join_connection, f);
    if (fclose(f) != 0) {
        free(*out);
        *out = NULL;
        return PEP_ENOMEM;
    }
    return 0;
}

/* SECURITY: a header the policy sets for the upstream (a credential, typically) is pep's
 * alone: an agent's header of the same name would otherwise travel next to it — first,
 * where many servers read it. */
static bool upstream_sets_header(const struct upstream *up, const char *name) {
    for (size_t i = 0; i < up->headers_len; i++)
        if (strcasecmp(up->headers[i].name, name) == 0) return true;
    return false;
}

static int add_header_line(struct curl_slist **list, const char *name, const char *value) {
    char line[UPSTREAM_MAX_HEADER_LINE];
    if (snprintf(line, sizeof line, "%s: %s", name, value) >= (int)sizeof line) return PEP_EINVAL;
    struct curl_slist *n = curl_slist_append(*list, line);
    if (!n) return PEP_ENOMEM;
    *list = n;
    return 0;
}

/* What the body says that forwarding needs: its "model" (cut on a character boundary,
 * never inside one: SPEC 6.2) and "stream": true (SPEC 4.6), when it is a JSON object. */
static void read_body_facts(const struct request *r, struct upstream_request *u) {
    if (!r->body_len) return;
    json_t *doc = json_loadb(r->body, r->body_len, 0, NULL);
    u->body_is_object = json_is_object(doc);
    const char *model = json_string_value(json_object_get(doc, "model"));
    if (model) {
        size_t n = pep_utf8_cut(model, strlen(model), sizeof u->model - 1);
        memcpy(u->model, model, n);
        u->model[n] = '\0';
    }
    u->stream = json_is_true(json_object_get(doc, "stream"));
    json_decref(doc);
}

/* The route's forward.path with the matched parameters put in (malloc'd, or NULL when
 * memory ran out).  A value was decoded when the path was matched: it is percent-encoded
 * again (all but RFC 3986 unreserved characters), so that a decoded '?', '/' or '%' stays
 * inside its segment instead of changing the upstream URL. */
static char *forward_path_render(const struct route *route, const struct route_match *m) {
    char *out = NULL;
    size_t out_len = 0;
    FILE *f = open_memstream(&out, &out_len);
    if (!f) return NULL;
    bool ok = true;
    for (size_t i = 0; ok && i < route->forward_parts_len; i++) {
        const struct forward_path_part *part = &route->forward_parts[i];
        if (part->literal) {
            ok = fputs(part->literal, f) >= 0;
        } else {
            ok = part->param_index < m->params_len;
            const struct route_param *v = ok ? &m->params[part->param_index] : NULL;
            char *escaped = v ? curl_easy_escape(NULL, v->value, (int)v->value_len) : NULL;
            ok = escaped && fputs(escaped, f) >= 0;
            curl_free(escaped);
        }
    }
    if (fclose(f) != 0 || !ok) {
        free(out);
        return NULL;
    }
    return out;
}

/* SPEC 4.2: a call may be sent again only when its method is idempotent, it carries an
 * Idempotency-Key, or its route says retry_safe. */
static bool safe_to_repeat(const struct request *r) {
    static const char *const idempotent[] = {"GET", "HEAD", "PUT", "DELETE"};
    for (size_t i = 0; i < PEP_ARRAY_LEN(idempotent); i++)
        if (strcmp(r->method, idempotent[i]) == 0) return true;
    return r->match.route->retry_safe ||
           MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Idempotency-Key") != NULL;
}

int upstream_capture(struct request *r, struct upstream_request *u) {
    const struct route *route = r->match.route;
    memset(u, 0, sizeof *u);
    char *rewritten = NULL;
    if (route->forward_path_params && !(rewritten = forward_path_render(route, &r->match)))
        return PEP_ENOMEM;
    const char *path = rewritten             ? rewritten
                       : route->forward_path ? route->forward_path
                                             : r->target;
    size_t path_len = path == r->target ? strcspn(r->target, "?") : strlen(path);
    if (asprintf(&u->path_query, "%.*s%s%s", (int)path_len, path, r->query ? "?" : "",
                 r->query ? r->query : "") < 0)
        u->path_query = NULL;
    free(rewritten);
    if (!u->path_query) return PEP_ENOMEM;

    struct header_copy hc = {.u = u};
    if (connection_tokens(r->conn, &hc.connection_tokens) != 0) return PEP_ENOMEM;
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, copy_header, &hc);
    free(hc.connection_tokens);
    if (hc.failed) return PEP_ENOMEM;
    u->has_accept = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Accept") != NULL;
    u->has_content_type =
        MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Content-Type") != NULL;
    conn_client_address(r->conn, u->client);
    memcpy(u->request_id, r->id, sizeof u->request_id);
    u->method = r->method;
    u->body = r->body;
    u->body_len = r->body_len;
    u->repeatable = safe_to_repeat(r);
    read_body_facts(r, u);
    return 0;
}

void upstream_request_clear(struct upstream_request *u) {
    free(u->path_query);
    for (size_t i = 0; i < u->headers_len; i++) {
        free(u->headers[i].name);
        free(u->headers[i].value);
    }
    free(u->headers);
    memset(u, 0, sizeof *u);
}

/* The body with its "model" set to model (malloc'd), or NULL when it cannot be rewritten
 * (not a JSON object, or out of memory): it is then sent as it came. */
static char *rewrite_model(const struct upstream_request *u, const char *model, size_t *len) {
    if (!u->body_is_object) return NULL;
    json_t *doc = json_loadb(u->body, u->body_len, 0, NULL);
    char *out = NULL;
    if (doc && json_object_set_new(doc, "model", json_string(model)) == 0)
        out = json_dumps(doc, JSON_COMPACT);
    json_decref(doc);
    if (out) *len = strlen(out);
    return out;
}

int upstream_attempt(const struct upstream_request *u, const struct upstream *up, const char *model,
                     struct forward_job *job, char **body_owned, char model_sent[256]) {
    free(job->url);
    curl_slist_free_all(job->headers);
    job->headers = NULL;
    free(*body_owned);
    *body_owned = NULL;
    if (asprintf(&job->url, "%s%s", up->base_url, u->path_query) < 0) job->url = NULL;
    if (!job->url) return PEP_ENOMEM;
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < u->headers_len; i++)
        if (!upstream_sets_header(up, u->headers[i].name))
            rc = add_header_line(&job->headers, u->headers[i].name, u->headers[i].value);
    /* SPEC 4.7: the agent's own X-Forwarded-* were dropped; this one is pep's word. */
    if (rc == 0 && !upstream_sets_header(up, "X-Forwarded-For"))
        rc = add_header_line(&job->headers, "X-Forwarded-For", u->client);
    if (rc == 0 && up->api_key_env) {
        /* SECURITY: the upstream key goes only into this header, to this upstream. */
        const char *key = getenv(up->api_key_env);
        if (key && *key) {
            char value[4096];
            snprintf(value, sizeof value, "Bearer %s", key);
            rc = add_header_line(&job->headers, "Authorization", value);
            explicit_bzero(value, sizeof value);
        }
    }
    for (size_t i = 0; rc == 0 && i < up->headers_len; i++) {
        const char *v = up->headers[i].env ? getenv(up->headers[i].env) : up->headers[i].value;
        if (v) rc = add_header_line(&job->headers, up->headers[i].name, v);
    }
    if (rc == 0) rc = add_header_line(&job->headers, "X-Request-Id", u->request_id);
    if (rc == 0) /* no "Expect: 100-continue" round trip */
        rc = add_header_line(&job->headers, "Expect", "");
    /* libcurl adds an Accept header (any type) and, to a body, "Content-Type:
     * application/x-www-form-urlencoded" when none is given: the upstream sees only what
     * the agent sent ("Name:" with no value removes libcurl's). */
    if (rc == 0 && !u->has_accept) rc = add_header_line(&job->headers, "Accept", "");
    if (rc == 0 && !u->has_content_type) rc = add_header_line(&job->headers, "Content-Type", "");
    job->method = u->method;
    job->body = u->body;
    job->body_len = u->body_len;
    snprintf(model_sent, 256, "%s", u->model);
    if (rc == 0 && model && (*body_owned = rewrite_model(u, model, &job->body_len))) {
        job->body = *body_owned;
        size_t n = pep_utf8_cut(model, strlen(model), 255);
        memcpy(model_sent, model, n);
        model_sent[n] = '\0';
    }
    job->timeout_ms = up->timeout_ms;
    job->idle_timeout_ms = up->idle_timeout_ms;
    job->repeatable = u->repeatable;
    return rc;
}
