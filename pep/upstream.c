/*
 * upstream.c — building the upstream call of an allowed request (see upstream.h).
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

struct header_copy {
    struct curl_slist *list;
    char *connection_tokens; /* every Connection header's value, joined by commas */
    const struct upstream *up;
    bool failed;
};

/* SECURITY: a header the policy sets for the upstream (a credential, typically) is pep's
 * alone: an agent's header of the same name would otherwise travel next to it — first,
 * where many servers read it. */
static bool upstream_sets_header(const struct upstream *up, const char *name) {
    for (size_t i = 0; i < up->headers_len; i++)
        if (strcasecmp(up->headers[i].name, name) == 0) return true;
    return false;
}

static enum MHD_Result copy_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                   const char *value) {
    (void)kind;
    struct header_copy *hc = cls;
    if (!forward_header_allowed(key, hc->connection_tokens) || upstream_sets_header(hc->up, key))
        return MHD_YES;
    char line[8192];
    if (snprintf(line, sizeof line, "%s: %s", key, value ? value : "") >= (int)sizeof line)
        return MHD_YES; /* an oversized header is not relayed */
    struct curl_slist *n = curl_slist_append(hc->list, line);
    if (!n) {
        hc->failed = true;
        return MHD_NO;
    }
    hc->list = n;
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

static int add_header_line(struct curl_slist **list, const char *name, const char *value) {
    char line[8192];
    if (snprintf(line, sizeof line, "%s: %s", name, value) >= (int)sizeof line) return PEP_EINVAL;
    struct curl_slist *n = curl_slist_append(*list, line);
    if (!n) return PEP_ENOMEM;
    *list = n;
    return 0;
}

/* The model the agent asked for, when the body is a JSON object with a "model" string. */
static void read_model(struct request *r) {
    const char *ct = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Content-Type");
    if (!r->body_len || !ct || !strstr(ct, "json")) return;
    json_t *doc = json_loadb(r->body, r->body_len, 0, NULL);
    const char *model = json_string_value(json_object_get(doc, "model"));
    if (model) { /* cut on a character boundary, never inside one (SPEC 6.2) */
        size_t n = pep_utf8_cut(model, strlen(model), sizeof r->model - 1);
        memcpy(r->model, model, n);
        r->model[n] = '\0';
    }
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

int upstream_prepare(struct request *r) {
    const struct route *route = r->match.route;
    const struct upstream *up = route->upstream;
    struct forward_job *job = &r->job;
    char *rewritten = NULL;
    if (route->forward_path_params && !(rewritten = forward_path_render(route, &r->match)))
        return PEP_ENOMEM;
    const char *path = rewritten             ? rewritten
                       : route->forward_path ? route->forward_path
                                             : r->target;
    size_t path_len = path == r->target ? strcspn(r->target, "?") : strlen(path);
    size_t url_len = strlen(up->base_url) + path_len + (r->query ? strlen(r->query) + 1 : 0) + 1;
    job->url = malloc(url_len);
    if (job->url)
        snprintf(job->url, url_len, "%s%.*s%s%s", up->base_url, (int)path_len, path,
                 r->query ? "?" : "", r->query ? r->query : "");
    free(rewritten);
    if (!job->url) return PEP_ENOMEM;

    struct header_copy hc = {.up = up};
    if (connection_tokens(r->conn, &hc.connection_tokens) != 0) return PEP_ENOMEM;
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, copy_header, &hc);
    free(hc.connection_tokens);
    job->headers = hc.list;
    if (hc.failed) return PEP_ENOMEM;
    /* SPEC 4.7: the agent's own X-Forwarded-* were dropped; this one is pep's word. */
    int rc = 0;
    if (!upstream_sets_header(up, "X-Forwarded-For")) {
        char client[CONN_ADDRESS_LEN];
        conn_client_address(r->conn, client);
        rc = add_header_line(&job->headers, "X-Forwarded-For", client);
    }
    if (rc == 0 && up->api_key_env) {
        /* SECURITY: the upstream key goes only into this header, to this upstream. */
        const char *key = getenv(up->api_key_env);
        if (key && *key) {
            char value[4096];
            snprintf(value, sizeof value, "Bearer %s", key);
            rc = add_header_line(&job->headers, "Authorization", value);
        }
    }
    for (size_t i = 0; rc == 0 && i < up->headers_len; i++) {
        const char *v = up->headers[i].env ? getenv(up->headers[i].env) : up->headers[i].value;
        if (v) rc = add_header_line(&job->headers, up->headers[i].name, v);
    }
    if (rc == 0) rc = add_header_line(&job->headers, "X-Request-Id", r->id);
    if (rc == 0) /* no "Expect: 100-continue" round trip */
        rc = add_header_line(&job->headers, "Expect", "");
    /* libcurl adds an Accept header (any type) and, to a body, "Content-Type:
     * application/x-www-form-urlencoded" when none is given: the upstream sees only what
     * the agent sent ("Name:" with no value removes libcurl's). */
    static const char *const curl_defaults[] = {"Accept", "Content-Type"};
    for (size_t i = 0; rc == 0 && i < PEP_ARRAY_LEN(curl_defaults); i++)
        if (!MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, curl_defaults[i]))
            rc = add_header_line(&job->headers, curl_defaults[i], "");
    job->method = r->method;
    job->body = r->body;
    job->body_len = r->body_len;
    job->timeout_ms = up->timeout_ms;
    job->idle_timeout_ms = up->idle_timeout_ms;
    job->repeatable = safe_to_repeat(r);
    read_model(r);
    return rc;
}
