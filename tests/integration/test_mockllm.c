/*
 * test_mockllm.c — integration tests of tools/mockllm.c, pep's fake upstream, through the
 * harness: one real mockllm process on port 0, driven over real HTTP.
 *
 * Every other integration test trusts mockllm to answer exactly what it was scripted to,
 * so this file checks each endpoint and each fault kind, the FIFO order and path filter of
 * the fault queue, the stats that tests read back, concurrency of delayed requests, and
 * clean shutdown.  Timing checks are loose bounds only (a delay is at least most of its
 * length; 50 concurrent 200 ms delays take less than running them one after another).
 *
 * Thread: cmocka's main thread; the concurrency tests start their own client threads.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <cmocka.h>

#include "pep/util.h"
#include "tests/integration/harness.h"

#define CHAT_PATH "/v1/chat/completions"

static struct h_proc g_mock;
static char g_chat_url[256];

static int group_setup(void **state) {
    (void)state;
    if (h_start_mockllm(&g_mock) != 0) return -1;
    snprintf(g_chat_url, sizeof(g_chat_url), "%s%s", g_mock.url, CHAT_PATH);
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    h_stop(&g_mock, SIGTERM);
    return 0;
}

static int reset(void **state) {
    (void)state;
    return h_mock_reset(g_mock.url);
}

/* POSTs a chat request for model; returns the status (the response is left in r). */
static long post_chat(struct h_resp *r, const char *body) {
    assert_int_equal(h_http(r, "POST", g_chat_url, body, NULL), 0);
    return r->status;
}

/* The string member key of root, or "<missing>" so that a failed check reports instead of
 * crashing on NULL. */
static const char *jstr(json_t *root, const char *key) {
    const char *v = json_string_value(json_object_get(root, key));
    return v != NULL ? v : "<missing>";
}

static void test_chat_echoes_model(void **state) {
    (void)state;
    struct h_resp r = {0};
    assert_int_equal(post_chat(&r, "{\"model\":\"gpt-4o-mini-test\",\"messages\":[{\"role\":"
                                   "\"user\",\"content\":\"hi\"}]}"),
                     200);
    assert_string_equal(h_header(&r, "content-type"), "application/json");
    json_t *j = h_json(&r);
    assert_non_null(j);
    assert_string_equal(jstr(j, "model"), "gpt-4o-mini-test");
    assert_string_equal(jstr(j, "object"), "chat.completion");
    assert_int_equal(strncmp(jstr(j, "id"), "chatcmpl-mock-", 14), 0);
    assert_true(json_is_integer(json_object_get(j, "created")));
    json_t *choice = json_array_get(json_object_get(j, "choices"), 0);
    json_t *msg = json_object_get(choice, "message");
    assert_string_equal(jstr(msg, "role"), "assistant");
    assert_string_equal(jstr(msg, "content"), "mock reply");
    assert_string_equal(jstr(choice, "finish_reason"), "stop");
    json_t *usage = json_object_get(j, "usage");
    assert_int_equal(json_integer_value(json_object_get(usage, "completion_tokens")), 2);
    assert_int_equal(json_integer_value(json_object_get(usage, "total_tokens")),
                     json_integer_value(json_object_get(usage, "prompt_tokens")) + 2);
    json_decref(j);

    /* Two answers never share an id. */
    char first_id[64];
    j = h_json(&r);
    snprintf(first_id, sizeof(first_id), "%s", jstr(j, "id"));
    json_decref(j);
    assert_int_equal(post_chat(&r, "{\"model\":\"m2\"}"), 200);
    j = h_json(&r);
    assert_string_equal(jstr(j, "model"), "m2");
    assert_string_not_equal(jstr(j, "id"), first_id);
    json_decref(j);
    h_resp_free(&r);
}

static void test_chat_bad_json_is_400(void **state) {
    (void)state;
    struct h_resp r = {0};
    assert_int_equal(post_chat(&r, "{\"model\": "), 400);
    json_t *j = h_json(&r);
    assert_non_null(j);
    json_t *err = json_object_get(j, "error");
    assert_string_equal(jstr(err, "type"), "invalid_request_error");
    assert_non_null(jstr(err, "message"));
    json_decref(j);
    assert_int_equal(post_chat(&r, "[1,2]"), 400);
    h_resp_free(&r);
}

static void test_echo(void **state) {
    (void)state;
    char url[256];
    snprintf(url, sizeof(url), "%s/tools/lookup?x=1&y=two", g_mock.url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "PUT", url, "hello body", "X-Custom-Header: abc",
                            "Authorization: Bearer upstream-key", "Content-Type: text/plain", NULL),
                     0);
    assert_int_equal(r.status, 200);
    json_t *j = h_json(&r);
    assert_non_null(j);
    assert_string_equal(jstr(j, "method"), "PUT");
    assert_string_equal(jstr(j, "path"), "/tools/lookup?x=1&y=two");
    json_t *query = json_object_get(j, "query");
    assert_string_equal(jstr(query, "x"), "1");
    assert_string_equal(jstr(query, "y"), "two");
    json_t *headers = json_object_get(j, "headers");
    assert_string_equal(jstr(headers, "x-custom-header"), "abc");
    assert_string_equal(jstr(headers, "authorization"), "Bearer upstream-key");
    assert_string_equal(jstr(headers, "content-type"), "text/plain");
    assert_string_equal(jstr(j, "body"), "hello body");
    json_decref(j);

    /* GET without a body echoes an empty body; POST to a non-chat path is an echo too. */
    snprintf(url, sizeof(url), "%s/plain", g_mock.url);
    assert_int_equal(h_http(&r, "GET", url, NULL, NULL), 0);
    j = h_json(&r);
    assert_string_equal(jstr(j, "method"), "GET");
    assert_string_equal(jstr(j, "body"), "");
    json_decref(j);
    h_resp_free(&r);
}

static void test_echo_raw_path(void **state) {
    (void)state;
    /* A path curl would normalize: mockllm must report it exactly as sent. */
    char *reply = NULL;
    assert_int_equal(h_raw_request(g_mock.url,
                                   "GET /a/%2e%2e/b?q=%41 HTTP/1.1\r\nHost: t\r\n"
                                   "Connection: close\r\n\r\n",
                                   &reply),
                     0);
    assert_non_null(reply);
    assert_int_equal(strncmp(reply, "HTTP/1.1 200", 12), 0);
    assert_non_null(strstr(reply, "\"path\":\"/a/%2e%2e/b?q=%41\""));
    assert_non_null(strstr(reply, "\"q\":\"A\""));
    free(reply);

    json_t *stats = h_mock_stats(g_mock.url);
    assert_non_null(stats);
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(stats, "by_path"), "/a/%2e%2e/b")), 1);
    json_decref(stats);
}

static void test_status_fault_twice_then_normal(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":2}"),
                     0);
    struct h_resp r = {0};
    const char *body = "{\"model\":\"m\"}";
    for (int i = 0; i < 2; i++) {
        assert_int_equal(post_chat(&r, body), 503);
        json_t *j = h_json(&r);
        assert_string_equal(jstr(json_object_get(j, "error"), "type"), "server_error");
        json_decref(j);
        assert_null(h_header(&r, "Retry-After"));
    }
    assert_int_equal(post_chat(&r, body), 200);
    assert_int_equal(post_chat(&r, body), 200);
    h_resp_free(&r);
}

static void test_status_fault_default_and_custom_body(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"status\"}"), 0);
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"status\",\"status\":500,"
                                              "\"body\":\"upstream exploded\"}"),
                     0);
    struct h_resp r = {0};
    assert_int_equal(post_chat(&r, "{}"), 503);
    assert_int_equal(post_chat(&r, "{}"), 500);
    assert_string_equal(r.body, "upstream exploded");
    assert_int_equal(post_chat(&r, "{}"), 200);
    h_resp_free(&r);
}

static void test_retry_after(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"status\",\"status\":429,"
                                              "\"retry_after\":\"7\"}"),
                     0);
    struct h_resp r = {0};
    assert_int_equal(post_chat(&r, "{}"), 429);
    assert_string_equal(h_header(&r, "Retry-After"), "7");
    assert_string_equal(h_header(&r, "retry-after"), "7");
    json_t *j = h_json(&r);
    assert_string_equal(jstr(json_object_get(j, "error"), "code"), "rate_limit_exceeded");
    json_decref(j);
    h_resp_free(&r);
}

static void test_context_overflow(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"context_overflow\"}"), 0);
    struct h_resp r = {0};
    assert_int_equal(post_chat(&r, "{\"model\":\"small\"}"), 400);
    json_t *j = h_json(&r);
    json_t *err = json_object_get(j, "error");
    assert_string_equal(jstr(err, "code"), "context_length_exceeded");
    assert_string_equal(jstr(err, "type"), "invalid_request_error");
    const char *prefix = "This model's maximum context length is";
    assert_int_equal(strncmp(jstr(err, "message"), prefix, strlen(prefix)), 0);
    json_decref(j);
    h_resp_free(&r);
}

static void test_delay(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"delay\",\"delay_ms\":300}"), 0);
    struct h_resp r = {0};
    int64_t t0 = pep_mono_us();
    assert_int_equal(post_chat(&r, "{\"model\":\"slow\"}"), 200);
    int64_t elapsed_ms = (pep_mono_us() - t0) / 1000;
    assert_true(elapsed_ms >= 250);
    json_t *j = h_json(&r);
    assert_string_equal(jstr(j, "model"), "slow");
    json_decref(j);
    h_resp_free(&r);
}

static void test_drop(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"drop\"}"), 0);
    struct h_resp r = {0};
    int rc = h_http(&r, "POST", g_chat_url, "{}", NULL);
    assert_int_not_equal(rc, 0);
    assert_int_equal(r.status, 0);
    assert_int_equal(post_chat(&r, "{}"), 200);
    h_resp_free(&r);
}

static void test_hang_times_out(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"hang\"}"), 0);
    struct h_resp r = {0};
    struct h_req req = {.url = g_chat_url, .body = "{}", .timeout_ms = 1000};
    assert_int_equal(h_request(&r, &req), CURLE_OPERATION_TIMEDOUT);
    assert_int_equal(r.status, 0);
    /* The hang holds one connection only. */
    assert_int_equal(post_chat(&r, "{}"), 200);
    h_resp_free(&r);
}

/* Counts "data: " events of an SSE body and checks each JSON one; returns the count of
 * JSON chunks, and whether [DONE] came last. */
static int count_sse_chunks(const char *body, const char *model, bool *done_last) {
    int chunks = 0;
    *done_last = false;
    const char *at = body;
    while ((at = strstr(at, "data: ")) != NULL) {
        at += 6;
        const char *end = strstr(at, "\n\n");
        assert_non_null(end);
        if (strncmp(at, "[DONE]", 6) == 0) {
            *done_last = strcmp(end, "\n\n") == 0;
        } else {
            json_t *j = json_loadb(at, (size_t)(end - at), 0, NULL);
            assert_non_null(j);
            assert_string_equal(jstr(j, "object"), "chat.completion.chunk");
            assert_string_equal(jstr(j, "model"), model);
            json_decref(j);
            chunks++;
        }
        at = end;
    }
    return chunks;
}

static void test_sse(void **state) {
    (void)state;
    struct h_resp r = {0};
    bool done_last = false;
    assert_int_equal(post_chat(&r, "{\"model\":\"streamer\",\"stream\":true}"), 200);
    assert_string_equal(h_header(&r, "Content-Type"), "text/event-stream");
    assert_int_equal(count_sse_chunks(r.body, "streamer", &done_last), 3);
    assert_true(done_last);

    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"sse\",\"chunks\":5,"
                                              "\"chunk_delay_ms\":20}"),
                     0);
    int64_t t0 = pep_mono_us();
    assert_int_equal(post_chat(&r, "{\"model\":\"streamer\"}"), 200);
    assert_true((pep_mono_us() - t0) / 1000 >= 4 * 20 * 3 / 4);
    assert_string_equal(h_header(&r, "Content-Type"), "text/event-stream");
    assert_int_equal(count_sse_chunks(r.body, "streamer", &done_last), 5);
    assert_true(done_last);
    h_resp_free(&r);
}

static void test_stats_and_last(void **state) {
    (void)state;
    struct h_resp r = {0};
    char other[256];
    snprintf(other, sizeof(other), "%s/other?k=v", g_mock.url);
    assert_int_equal(post_chat(&r, "{}"), 200);
    assert_int_equal(post_chat(&r, "{}"), 200);
    assert_int_equal(h_http(&r, "DELETE", other, NULL, "Authorization: Bearer sk-upstream",
                            "X-Request-Id: rid-1", NULL),
                     0);
    /* A fault on every path must not touch the control API, nor be consumed by it. */
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"status\",\"status\":500}"), 0);

    json_t *s = h_mock_stats(g_mock.url);
    assert_non_null(s);
    assert_int_equal(json_integer_value(json_object_get(s, "hits")), 3);
    assert_int_equal(json_integer_value(json_object_get(s, "faults_pending")), 1);
    json_t *by_path = json_object_get(s, "by_path");
    assert_int_equal(json_object_size(by_path), 2);
    assert_int_equal(json_integer_value(json_object_get(by_path, CHAT_PATH)), 2);
    assert_int_equal(json_integer_value(json_object_get(by_path, "/other")), 1);
    json_t *last = json_object_get(s, "last");
    assert_string_equal(jstr(last, "method"), "DELETE");
    assert_string_equal(jstr(last, "path"), "/other?k=v");
    assert_string_equal(jstr(last, "body"), "");
    json_t *headers = json_object_get(last, "headers");
    assert_string_equal(jstr(headers, "authorization"), "Bearer sk-upstream");
    assert_string_equal(jstr(headers, "x-request-id"), "rid-1");
    json_decref(s);

    /* The recent list keeps every request, oldest first. */
    char url[256];
    snprintf(url, sizeof(url), "%s/_mock/requests", g_mock.url);
    assert_int_equal(h_http(&r, "GET", url, NULL, NULL), 0);
    s = h_json(&r);
    json_t *list = json_object_get(s, "requests");
    assert_int_equal(json_array_size(list), 3);
    assert_string_equal(jstr(json_array_get(list, 0), "path"), CHAT_PATH);
    assert_string_equal(jstr(json_array_get(list, 0), "body"), "{}");
    assert_string_equal(jstr(json_array_get(list, 2), "method"), "DELETE");
    json_decref(s);

    /* Reset clears counters, last and the pending fault. */
    assert_int_equal(h_mock_reset(g_mock.url), 0);
    s = h_mock_stats(g_mock.url);
    assert_int_equal(json_integer_value(json_object_get(s, "hits")), 0);
    assert_int_equal(json_integer_value(json_object_get(s, "faults_pending")), 0);
    assert_int_equal(json_object_size(json_object_get(s, "by_path")), 0);
    assert_true(json_is_null(json_object_get(s, "last")));
    json_decref(s);
    assert_int_equal(post_chat(&r, "{}"), 200);
    h_resp_free(&r);
}

static void test_fault_path_filter_and_fifo(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"status\",\"status\":502,"
                                              "\"path\":\"/only\"}"),
                     0);
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"status\",\"status\":504}"), 0);
    char only[256];
    snprintf(only, sizeof(only), "%s/only?x=1", g_mock.url);
    struct h_resp r = {0};
    /* The chat path skips the /only fault and takes the next one. */
    assert_int_equal(post_chat(&r, "{}"), 504);
    assert_int_equal(post_chat(&r, "{}"), 200);
    assert_int_equal(h_http(&r, "GET", only, NULL, NULL), 0);
    assert_int_equal(r.status, 502);
    assert_int_equal(h_http(&r, "GET", only, NULL, NULL), 0);
    assert_int_equal(r.status, 200);
    h_resp_free(&r);
}

static void test_bad_fault_refused(void **state) {
    (void)state;
    char url[256];
    snprintf(url, sizeof(url), "%s/_mock/faults", g_mock.url);
    static const char *const bad[] = {
        "{\"kind\":\"explode\"}",
        "{\"count\":2}",
        "{\"kind\":\"status\",\"count\":0}",
        "{\"kind\":\"status\",\"status\":99}",
        "{\"kind\":\"status\",\"typo\":1}",
        "{\"kind\":\"status\",\"retry_after\":\"1\\r\\nX: y\"}",
        "not json",
        "{\"kind\":\"status\",\"path\":\"relative\"}",
    };
    struct h_resp r = {0};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(h_http(&r, "POST", url, bad[i], NULL), 0);
        assert_int_equal(r.status, 400);
    }
    json_t *s = h_mock_stats(g_mock.url);
    assert_int_equal(json_integer_value(json_object_get(s, "faults_pending")), 0);
    json_decref(s);
    h_resp_free(&r);
}

static void test_body_too_large(void **state) {
    (void)state;
    size_t len = ((size_t)8 << 20) + 1;
    char *big = malloc(len + 1);
    assert_non_null(big);
    memset(big, 'a', len);
    big[len] = '\0';
    struct h_resp r = {0};
    struct h_req req = {.url = g_chat_url, .body = big, .body_len = len};
    h_request(&r, &req);
    /* mockllm answers before reading the body; curl may or may not see the answer
     * before the connection closes, but it never sees a 200. */
    assert_int_not_equal(r.status, 200);
    free(big);
    assert_int_equal(post_chat(&r, "{}"), 200);
    h_resp_free(&r);
}

struct client {
    pthread_t thread;
    const char *url;
    long timeout_ms;
    int rc;
    long status;
};

static void *client_main(void *arg) {
    struct client *c = arg;
    struct h_resp r = {0};
    struct h_req req = {.url = c->url, .body = "{\"model\":\"c\"}", .timeout_ms = c->timeout_ms};
    c->rc = h_request(&r, &req);
    c->status = r.status;
    h_resp_free(&r);
    return NULL;
}

static void test_concurrent_delays(void **state) {
    (void)state;
    enum { N = 50 };
    assert_int_equal(h_mock_fault(g_mock.url, "{\"kind\":\"delay\",\"delay_ms\":200,"
                                              "\"count\":50}"),
                     0);
    struct client clients[N];
    int64_t t0 = pep_mono_us();
    for (int i = 0; i < N; i++) {
        clients[i] = (struct client){.url = g_chat_url, .timeout_ms = 20000};
        assert_int_equal(pthread_create(&clients[i].thread, NULL, client_main, &clients[i]), 0);
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(pthread_join(clients[i].thread, NULL), 0);
    int64_t elapsed_ms = (pep_mono_us() - t0) / 1000;
    for (int i = 0; i < N; i++) {
        assert_int_equal(clients[i].rc, 0);
        assert_int_equal(clients[i].status, 200);
    }
    assert_true(elapsed_ms >= 190);
    assert_true(elapsed_ms < N * 200);
    json_t *s = h_mock_stats(g_mock.url);
    assert_int_equal(json_integer_value(json_object_get(s, "hits")), N);
    assert_int_equal(json_integer_value(json_object_get(s, "faults_pending")), 0);
    json_decref(s);
}

static void test_sigterm_exits_zero_with_hung_request(void **state) {
    (void)state;
    struct h_proc m;
    assert_int_equal(h_start_mockllm(&m), 0);
    assert_int_equal(h_mock_fault(m.url, "{\"kind\":\"hang\"}"), 0);
    char url[256];
    snprintf(url, sizeof(url), "%s%s", m.url, CHAT_PATH);
    struct client c = {.url = url, .timeout_ms = 15000};
    assert_int_equal(pthread_create(&c.thread, NULL, client_main, &c), 0);
    /* Wait (bounded) until the hung request has reached mockllm. */
    for (int i = 0; i < 500; i++) {
        json_t *s = h_mock_stats(m.url);
        json_int_t hits = json_integer_value(json_object_get(s, "hits"));
        json_decref(s);
        if (hits == 1) break;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 10000000L};
        nanosleep(&ts, NULL);
    }
    int status = h_stop(&m, SIGTERM);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(pthread_join(c.thread, NULL), 0);
    assert_int_not_equal(c.rc, 0);
    assert_int_equal(c.status, 0);
}

static void test_sigint_exits_zero(void **state) {
    (void)state;
    struct h_proc m;
    assert_int_equal(h_start_mockllm(&m), 0);
    assert_int_equal(strncmp(m.url, "http://127.0.0.1:", 17), 0);
    int status = h_stop(&m, SIGINT);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(m.pid, 0);
}

/* Last: the shared instance, after all the traffic above, also stops cleanly (under
 * sanitizers a leak or an error would make its exit status non-zero). */
static void test_shared_instance_stops_clean(void **state) {
    (void)state;
    int status = h_stop(&g_mock, SIGTERM);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_chat_echoes_model, reset),
        cmocka_unit_test_setup(test_chat_bad_json_is_400, reset),
        cmocka_unit_test_setup(test_echo, reset),
        cmocka_unit_test_setup(test_echo_raw_path, reset),
        cmocka_unit_test_setup(test_status_fault_twice_then_normal, reset),
        cmocka_unit_test_setup(test_status_fault_default_and_custom_body, reset),
        cmocka_unit_test_setup(test_retry_after, reset),
        cmocka_unit_test_setup(test_context_overflow, reset),
        cmocka_unit_test_setup(test_delay, reset),
        cmocka_unit_test_setup(test_drop, reset),
        cmocka_unit_test_setup(test_hang_times_out, reset),
        cmocka_unit_test_setup(test_sse, reset),
        cmocka_unit_test_setup(test_stats_and_last, reset),
        cmocka_unit_test_setup(test_fault_path_filter_and_fifo, reset),
        cmocka_unit_test_setup(test_bad_fault_refused, reset),
        cmocka_unit_test_setup(test_body_too_large, reset),
        cmocka_unit_test_setup(test_concurrent_delays, reset),
        cmocka_unit_test(test_sigterm_exits_zero_with_hung_request),
        cmocka_unit_test(test_sigint_exits_zero),
        cmocka_unit_test(test_shared_instance_stops_clean),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
