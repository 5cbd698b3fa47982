/*
 * keys.c — pep's ES256 signing keys: load, create, rotate, publish (JWKS), sign.
 *
 * Each key is one unencrypted PKCS#8 PEM file DATA/keys/<kid>.pem (mode 0600, written
 * atomically) in a 0700 directory.  The kid is the RFC 7638 thumbprint of the public key:
 * base64url(SHA-256('{"crv":"P-256","kty":"EC","x":"…","y":"…"}')), so it is derived from
 * the key itself and the file name is only a convenience.
 *
 * The ring is a singly linked list of keys, newest first, that only grows while the ring
 * lives: a key is prepended (with a release store of the head) once it is whole, and freed
 * only by keys_free.  Readers (token verification on every request, the JWKS, checkpoint
 * signing on the audit writer) walk it without a lock; what may change after a key is
 * published — which key is active, when a rotated-out key retires — is read and written
 * with atomic loads and stores, in an order that never shows a reader a state no rotation
 * meant: the old key's retirement is stored before the new key is published, and the new
 * key is published before it becomes the active one.
 *
 * States (keys.h): the active key signs; another key verifies tokens while now <
 * retires_at (KEYS_NEVER for keys without rotation records), and is retired after, when
 * it only verifies checkpoints.  retires_at is set once, at the rotation that takes the
 * key out, by the caller (pep/admin_keys.c: the latest expiry of the tokens the key
 * signed, plus the clock skew).
 *
 * Invariants of a loaded keyring: at least one key; kids are distinct; every key is a
 * P-256 key pair whose public half matches its private half (pairwise-checked at load),
 * held parsed twice: the pair (signs) and the public half alone (verifies, parsed from the
 * public PEM the way any other verifier would see it); the active key is one of the list.
 *
 * Signing builds the compact JWS here — header and claims as compact JSON with sorted keys,
 * base64url, then ES256 over "header.payload" with EVP_DigestSign and the DER signature
 * OpenSSL returns rewritten as the raw R‖S a JWS carries.  libjwt is not used: its encoder
 * re-parses the private PEM on every signature.  A token signature (claims with `exp`)
 * holds sign_lock for reading and notes the token (jti, exp) in its key's list of recent
 * signatures; a rotation holds it for writing, so once it has it what the old key signed is
 * final.  The list is what the store may not know yet: a token's record is written after
 * it is signed, and a rotation must count a token whose record is still on its way.  It
 * keeps the last KEYS_RECENT_US of signatures (older ones are in the store, or failed).
 *
 * Threads: loading, creating and rotating do file I/O and belong to the main thread or
 * the admin handler doing a rotation (rotations are serialized by rotate_lock).  Lookups,
 * the JWKS and signatures may run on any thread; each signature has its own EVP_MD_CTX.
 */
#include "pep/keys.h"

#include "pep/util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* One key pair of the ring. */
struct keys_entry {
    struct keys_entry *older;   /* the next older key; fixed before the entry is published */
    char kid[KEYS_KID_LEN + 1]; /* RFC 7638 thumbprint */
    char x[KEYS_KID_LEN + 1];   /* base64url of the 32-byte X coordinate (JWKS) */
    char y[KEYS_KID_LEN + 1];   /* base64url of the 32-byte Y coordinate (JWKS) */
    unsigned char *private_pem; /* PKCS#8 PEM (the file's content); cleansed on free */
    size_t private_pem_len;     /* bytes, without the trailing NUL kept after them */
    unsigned char *public_pem;  /* SubjectPublicKeyInfo PEM (tests cross-check libjwt) */
    size_t public_pem_len;
    EVP_PKEY *pkey;             /* the parsed key pair: signs */
    EVP_PKEY *public_key;       /* the public half alone, parsed from public_pem: verifies */
    struct timespec mtime;      /* of the key file: orders keys without rotation records */
    int64_t created_at_s;       /* the store's row, else the file's mtime; fixed once published
                                   (keys_sql_load runs before the ring is shared) */
    bool in_store;              /* the signing_keys table has a row for it (rotate_lock) */
    int64_t rotated_out_at_s;   /* atomic: when a rotation took it out; 0 never */
    int64_t retires_at_s;       /* atomic: when it stops verifying tokens (not active) */
    struct keys_recent *recent; /* tokens it signed lately, oldest first (recent_lock) */
    size_t recent_len, recent_cap;
};

/* A token a key signed: what a rotation needs to know of it until the store does. */
struct keys_recent {
    char jti[64];           /* its jti ("" when absent or longer: never known to the store) */
    int64_t exp;            /* its exp claim */
    int64_t signed_mono_us; /* when it was signed */
};

/* How long a signature stays in its key's recent list: far longer than a token's record
 * takes to be written (a batch's fsync), or to fail. */
#define KEYS_RECENT_US (60LL * 1000000)

struct keyring {
    struct keys_entry *head;   /* atomic: newest first; never NULL once loaded */
    struct keys_entry *active; /* atomic: the key that signs */
    size_t len;                /* atomic: keys in the list */
    /* Read-held by each token signature, write-held by a rotation from its begin to its
     * commit or abort: what the old key signed is final while the rotation decides. */
    pthread_rwlock_t sign_lock;
    pthread_mutex_t rotate_lock; /* one rotation at a time */
    pthread_mutex_t recent_lock; /* every key's recent list */
    char dir[PATH_MAX];          /* DATA/keys; "" for a read-only ring (cannot rotate) */
};

#define KEYS_COORD_LEN 32 /* P-256 coordinates, big-endian, left-padded */
#define KEYS_PENDING_SUFFIX ".pending"

static void keys_entry_clear(struct keys_entry *e) {
    if (e->private_pem) {
        OPENSSL_cleanse(e->private_pem, e->private_pem_len);
        free(e->private_pem);
    }
    free(e->public_pem);
    EVP_PKEY_free(e->pkey);
    EVP_PKEY_free(e->public_key);
    free(e->recent);
    memset(e, 0, sizeof *e);
}

static void keys_entry_free(struct keys_entry *e) {
    if (!e) return;
    keys_entry_clear(e);
    free(e);
}

static struct keys_entry *keys_head(const struct keyring *k) {
    return __atomic_load_n(&k->head, __ATOMIC_ACQUIRE);
}

static struct keys_entry *keys_active(const struct keyring *k) {
    return __atomic_load_n(&k->active, __ATOMIC_ACQUIRE);
}

void keys_free(struct keyring *k) {
    if (!k) return;
    struct keys_entry *e = k->head;
    while (e) {
        struct keys_entry *older = e->older;
        keys_entry_free(e);
        e = older;
    }
    pthread_rwlock_destroy(&k->sign_lock);
    pthread_mutex_destroy(&k->rotate_lock);
    pthread_mutex_destroy(&k->recent_lock);
    free(k);
}

/* An empty ring (no key yet). */
static struct keyring *keys_ring_new(void) {
    struct keyring *k = calloc(1, sizeof *k);
    if (!k) return NULL;
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* A rotation waits for the signatures in progress, not for every one that follows. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int rc = pthread_rwlock_init(&k->sign_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (rc != 0) {
        free(k);
        return NULL;
    }
    if (pthread_mutex_init(&k->rotate_lock, NULL) != 0) {
        pthread_rwlock_destroy(&k->sign_lock);
        free(k);
        return NULL;
    }
    if (pthread_mutex_init(&k->recent_lock, NULL) != 0) {
        pthread_mutex_destroy(&k->rotate_lock);
        pthread_rwlock_destroy(&k->sign_lock);
        free(k);
        return NULL;
    }
    return k;
}

/* Prepends e (whole) to the ring. */
static void keys_push(struct keyring *k, struct keys_entry *e) {
    e->older = k->head;
    __atomic_store_n(&k->head, e, __ATOMIC_RELEASE);
    __atomic_add_fetch(&k->len, 1, __ATOMIC_RELAXED);
}

/* Copies a memory BIO's contents into a malloc'd NUL-terminated buffer. */
static int keys_bio_take(BIO *bio, unsigned char **out, size_t *out_len) {
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    if (n <= 0 || !data) return PEP_ECRYPTO;
    unsigned char *copy = malloc((size_t)n + 1);
    if (!copy) return PEP_ENOMEM;
    memcpy(copy, data, (size_t)n);
    copy[n] = '\0';
    *out = copy;
    *out_len = (size_t)n;
    return 0;
}

/* Writes one public coordinate as base64url of exactly 32 bytes. */
static int keys_coord_b64(const EVP_PKEY *pkey, const char *param, char out[KEYS_KID_LEN + 1]) {
    BIGNUM *bn = NULL;
    uint8_t buf[KEYS_COORD_LEN];
    char *b64 = NULL;
    int rc = PEP_ECRYPTO;

    if (EVP_PKEY_get_bn_param(pkey, param, &bn) != 1) goto out;
    if (BN_bn2binpad(bn, buf, sizeof buf) != (int)sizeof buf) goto out;
    b64 = pep_base64url_encode(buf, sizeof buf);
    if (!b64) {
        rc = PEP_ENOMEM;
        goto out;
    }
    if (strlen(b64) != KEYS_KID_LEN) goto out;
    memcpy(out, b64, KEYS_KID_LEN + 1);
    rc = 0;
out:
    BN_free(bn);
    free(b64);
    return rc;
}

/* True when pkey is an EC key on P-256 (prime256v1 / secp256r1). */
static bool keys_is_p256(const EVP_PKEY *pkey) {
    char group[64];
    size_t len = 0;
    if (!EVP_PKEY_is_a(pkey, "EC")) return false;
    if (EVP_PKEY_get_group_name(pkey, group, sizeof group, &len) != 1) return false;
    int nid = OBJ_txt2nid(group);
    if (nid == NID_undef) nid = EC_curve_nist2nid(group);
    return nid == NID_X9_62_prime256v1;
}

/*
 * Fills e from a P-256 key pair (taking ownership of pkey on success): coordinates,
 * thumbprint kid, private and public PEM, and the public key parsed back from its PEM.
 */
static int keys_entry_from_pkey(EVP_PKEY *pkey, struct keys_entry *e, struct pep_err *err) {
    BIO *priv = NULL, *pub = NULL, *pub_in = NULL;
    EVP_PKEY_CTX *check = NULL;
    char *kid = NULL;
    int rc;

    memset(e, 0, sizeof *e);
    if (!keys_is_p256(pkey)) {
        rc = pep_err_set(err, PEP_ECRYPTO, "key is not an EC P-256 key");
        goto out;
    }
    /* SECURITY: a key file whose public half was swapped (tampering, corruption) would
     * publish a JWKS entry that does not verify our own signatures; refuse it at load. */
    check = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    if (!check || EVP_PKEY_pairwise_check(check) != 1) {
        rc = pep_err_set(err, PEP_ECRYPTO, "key pair check failed");
        goto out;
    }
    if ((rc = keys_coord_b64(pkey, OSSL_PKEY_PARAM_EC_PUB_X, e->x)) != 0 ||
        (rc = keys_coord_b64(pkey, OSSL_PKEY_PARAM_EC_PUB_Y, e->y)) != 0) {
        pep_err_set(err, rc, "cannot read the public key coordinates");
        goto out;
    }

    /* RFC 7638 §3.2: required members only, lexicographic order, no whitespace. */
    char jwk[160];
    int n = snprintf(jwk, sizeof jwk,
                     "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}", e->x, e->y);
    if (n < 0 || (size_t)n >= sizeof jwk) {
        rc = pep_err_set(err, PEP_ECRYPTO, "thumbprint input too long");
        goto out;
    }
    uint8_t digest[32];
    pep_sha256(jwk, (size_t)n, digest);
    kid = pep_base64url_encode(digest, sizeof digest);
    if (!kid || strlen(kid) != KEYS_KID_LEN) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    memcpy(e->kid, kid, KEYS_KID_LEN + 1);

    priv = BIO_new(BIO_s_mem());
    pub = BIO_new(BIO_s_mem());
    if (!priv || !pub) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    if (PEM_write_bio_PrivateKey(priv, pkey, NULL, NULL, 0, NULL, NULL) != 1 ||
        PEM_write_bio_PUBKEY(pub, pkey) != 1) {
        rc = pep_err_set(err, PEP_ECRYPTO, "cannot encode the key as PEM");
        goto out;
    }
    if ((rc = keys_bio_take(priv, &e->private_pem, &e->private_pem_len)) != 0 ||
        (rc = keys_bio_take(pub, &e->public_pem, &e->public_pem_len)) != 0) {
        pep_err_set(err, rc, "cannot copy the key PEM");
        goto out;
    }
    pub_in = BIO_new_mem_buf(e->public_pem, (int)e->public_pem_len);
    if (!pub_in || !(e->public_key = PEM_read_bio_PUBKEY(pub_in, NULL, NULL, NULL))) {
        rc = pep_err_set(err, PEP_ECRYPTO, "cannot parse the public key back");
        goto out;
    }
    e->pkey = pkey;
    rc = 0;
out:
    if (rc) {
        e->pkey = NULL; /* the caller still owns pkey on failure */
        keys_entry_clear(e);
    }
    EVP_PKEY_CTX_free(check);
    BIO_free(priv); /* memory BIOs clear their buffer when freed */
    BIO_free(pub);
    BIO_free(pub_in);
    free(kid);
    return rc;
}

/* SECURITY: an encrypted key file must fail to load, never prompt on the terminal. */
static int keys_no_passphrase(char *buf, int size, int rwflag, void *u) {
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

/* Loads one key file into e.  With repair, a key file others may read is set to 0600;
 * read-only loading (offline verification) changes nothing on disk: the directory may be
 * someone else's, or evidence. */
static int keys_load_file(const char *path, bool repair, struct keys_entry *e,
                          struct pep_err *err) {
    BIO *bio = NULL;
    EVP_PKEY *pkey = NULL;
    struct stat st;
    int rc;

    /* SECURITY: O_NOFOLLOW — a symlink planted in the key directory is not a key of ours. */
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return pep_err_set(err, PEP_EIO, "%s: %s", path, strerror(errno));
    if (fstat(fd, &st) != 0) {
        rc = pep_err_set(err, PEP_EIO, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = pep_err_set(err, PEP_EIO, "%s: not a regular file", path);
        goto out;
    }
    /* SECURITY: a private key readable by others is repaired rather than refused, so
     * that a copy made with a lax umask does not keep pep from starting — but loudly. */
    if (repair && (st.st_mode & 077)) {
        fprintf(stderr, "pep: warning: key file %s had mode %04o; setting it to 0600\n", path,
                (unsigned)(st.st_mode & 07777));
        if (fchmod(fd, 0600) != 0) {
            rc = pep_err_set(err, PEP_EIO, "%s: chmod 0600: %s", path, strerror(errno));
            goto out;
        }
    }
    bio = BIO_new_fd(fd, BIO_NOCLOSE);
    if (!bio) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    pkey = PEM_read_bio_PrivateKey(bio, NULL, keys_no_passphrase, NULL);
    if (!pkey) {
        rc = pep_err_set(err, PEP_ECRYPTO, "%s: not an unencrypted PEM private key", path);
        goto out;
    }
    if ((rc = keys_entry_from_pkey(pkey, e, err)) != 0) {
        char why[sizeof err->msg];
        snprintf(why, sizeof why, "%s", err ? err->msg : "");
        pep_err_set(err, rc, "%s: %s", path, why);
        goto out;
    }
    pkey = NULL; /* owned by e now */
    e->mtime = st.st_mtim;
    rc = 0;
out:
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    close(fd);
    return rc;
}

/* Newest first; among equal mtimes the greatest kid first. */
static int keys_cmp_newest(const void *a, const void *b) {
    const struct keys_entry *x = *(const struct keys_entry *const *)a;
    const struct keys_entry *y = *(const struct keys_entry *const *)b;
    if (x->mtime.tv_sec != y->mtime.tv_sec) return x->mtime.tv_sec > y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec) return x->mtime.tv_nsec > y->mtime.tv_nsec ? -1 : 1;
    return -strcmp(x->kid, y->kid);
}

static bool keys_is_key_file_name(const char *name) {
    size_t n = strlen(name);
    return name[0] != '.' && n > 4 && strcmp(name + n - 4, ".pem") == 0;
}

/* The entry named kid, or NULL.  A keyring holds a handful of keys: a linear scan of
 * 44-byte strings is cheaper than any index. */
static struct keys_entry *keys_find(const struct keyring *k, const char *kid) {
    if (!kid) return NULL;
    for (struct keys_entry *e = keys_head(k); e; e = e->older) {
        if (strcmp(e->kid, kid) == 0) return e;
    }
    return NULL;
}

/*
 * Loads every *.pem of dir into a new ring (repair: see keys_load_file): sorted newest
 * first, the newest active, every other one verifying without end — the states of a data
 * dir whose store has no rotation records.  Zero keys is not an error here (an empty ring).
 */
static int keys_load_dir(const char *dir, bool repair, struct keyring **out, struct pep_err *err) {
    struct keyring *k = keys_ring_new();
    struct keys_entry **v = NULL;
    size_t len = 0, cap = 0;
    DIR *d = NULL;
    int rc = 0;

    if (!k) return pep_err_set(err, PEP_ENOMEM, "out of memory");
    d = opendir(dir);
    if (!d) {
        rc = pep_err_set(err, PEP_EIO, "%s: %s", dir, strerror(errno));
        goto out;
    }
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) rc = pep_err_set(err, PEP_EIO, "%s: %s", dir, strerror(errno));
            break;
        }
        if (!keys_is_key_file_name(de->d_name)) continue;
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", dir, de->d_name) >= (int)sizeof path) {
            rc = pep_err_set(err, PEP_EINVAL, "%s: path too long", dir);
            break;
        }
        if (len == cap) {
            size_t ncap = cap ? 2 * cap : 4;
            struct keys_entry **n = realloc(v, ncap * sizeof *n);
            if (!n) {
                rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
                break;
            }
            v = n;
            cap = ncap;
        }
        struct keys_entry *e = calloc(1, sizeof *e);
        if (!e) {
            rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
            break;
        }
        if ((rc = keys_load_file(path, repair, e, err)) != 0) {
            free(e);
            break;
        }
        size_t stem = strlen(de->d_name) - 4;
        if (stem != KEYS_KID_LEN || memcmp(de->d_name, e->kid, KEYS_KID_LEN) != 0)
            fprintf(stderr, "pep: warning: key file %s holds the key with kid %s\n", path, e->kid);
        bool duplicate = false;
        for (size_t i = 0; i < len && !duplicate; i++)
            duplicate = strcmp(v[i]->kid, e->kid) == 0;
        if (duplicate) {
            fprintf(stderr, "pep: warning: key file %s repeats kid %s; ignored\n", path, e->kid);
            keys_entry_free(e);
            continue;
        }
        v[len++] = e;
    }
    if (rc == 0) {
        if (len > 1) qsort(v, len, sizeof *v, keys_cmp_newest);
        /* Oldest pushed first: the list ends newest first. */
        for (size_t i = len; i-- > 0;) {
            v[i]->created_at_s = v[i]->mtime.tv_sec;
            v[i]->retires_at_s = KEYS_NEVER;
            keys_push(k, v[i]);
        }
        if (len > 0) k->active = v[0];
        len = 0; /* owned by the ring now */
    }
out:
    for (size_t i = 0; i < len; i++)
        keys_entry_free(v[i]);
    free(v);
    if (d) closedir(d);
    if (rc) {
        keys_free(k);
        return rc;
    }
    *out = k;
    return 0;
}

/* Makes sure path is a directory, creating it 0700 when missing.  With `private`, a
 * group/world-accessible existing directory is warned about and set to 0700. */
static int keys_ensure_dir(const char *path, bool private, struct pep_err *err) {
    struct stat st;
    if (mkdir(path, 0700) == 0) {
        /* mkdir's mode passes through the umask; make the result exact. */
        if (chmod(path, 0700) != 0)
            return pep_err_set(err, PEP_EIO, "chmod %s: %s", path, strerror(errno));
        return 0;
    }
    if (errno != EEXIST) return pep_err_set(err, PEP_EIO, "mkdir %s: %s", path, strerror(errno));
    if (stat(path, &st) != 0) return pep_err_set(err, PEP_EIO, "%s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return pep_err_set(err, PEP_EIO, "%s: not a directory", path);
    if (private && (st.st_mode & 077)) {
        fprintf(stderr, "pep: warning: key directory %s had mode %04o; setting it to 0700\n", path,
                (unsigned)(st.st_mode & 07777));
        if (chmod(path, 0700) != 0)
            return pep_err_set(err, PEP_EIO, "chmod %s: %s", path, strerror(errno));
    }
    return 0;
}

static int keys_dir_path(const char *data_dir, char out[PATH_MAX], struct pep_err *err) {
    if (!data_dir || !*data_dir) return pep_err_set(err, PEP_EINVAL, "no data directory");
    if (snprintf(out, PATH_MAX, "%s/keys", data_dir) >= PATH_MAX)
        return pep_err_set(err, PEP_EINVAL, "%s: path too long", data_dir);
    int rc = keys_ensure_dir(data_dir, false, err);
    if (rc == 0) rc = keys_ensure_dir(out, true, err);
    return rc;
}

/* fsync of a directory, so that a rename or unlink in it is durable.  0 or PEP_EIO. */
static int keys_sync_dir(const char *dir) {
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return PEP_EIO;
    int rc = fsync(dfd) == 0 ? 0 : PEP_EIO;
    close(dfd);
    return rc;
}

/* Generates a P-256 key pair into a new entry (*out, free with keys_entry_free). */
static int keys_generate(struct keys_entry **out, struct pep_err *err) {
    struct keys_entry *e = calloc(1, sizeof *e);
    EVP_PKEY *pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    int rc;
    *out = NULL;
    if (!e || !pkey) {
        rc = pep_err_set(err, e ? PEP_ECRYPTO : PEP_ENOMEM, "cannot generate a P-256 key");
        goto fail;
    }
    if ((rc = keys_entry_from_pkey(pkey, e, err)) != 0) goto fail;
    *out = e;
    return 0;
fail:
    EVP_PKEY_free(pkey);
    free(e);
    return rc;
}

/*
 * Generates a P-256 key and writes it to dir/<kid>.pem (0600, atomic, directory synced).
 * When newer_than is given the file's mtime is set past it if the clock did not already
 * do so, so that the new key is the active one even on coarse-timestamp filesystems.
 */
static int keys_create_file(const char *dir, const struct timespec *newer_than,
                            struct pep_err *err) {
    struct keys_entry *e = NULL;
    char path[PATH_MAX];
    int rc;

    if ((rc = keys_generate(&e, err)) != 0) return rc;
    if (snprintf(path, sizeof path, "%s/%s.pem", dir, e->kid) >= (int)sizeof path) {
        rc = pep_err_set(err, PEP_EINVAL, "%s: path too long", dir);
        goto out;
    }
    if ((rc = pep_write_file_atomic(path, e->private_pem, e->private_pem_len, 0600)) != 0) {
        pep_err_set(err, rc, "cannot write %s: %s", path, strerror(errno));
        goto out;
    }
    if (newer_than) {
        struct stat st;
        if (stat(path, &st) != 0) {
            rc = pep_err_set(err, PEP_EIO, "%s: %s", path, strerror(errno));
            goto out;
        }
        bool newer =
            st.st_mtim.tv_sec > newer_than->tv_sec ||
            (st.st_mtim.tv_sec == newer_than->tv_sec && st.st_mtim.tv_nsec > newer_than->tv_nsec);
        if (!newer) {
            struct timespec t[2] = {{.tv_nsec = UTIME_OMIT}, *newer_than};
            if (++t[1].tv_nsec >= 1000000000L) {
                t[1].tv_sec++;
                t[1].tv_nsec = 0;
            }
            if (utimensat(AT_FDCWD, path, t, 0) != 0) {
                rc = pep_err_set(err, PEP_EIO, "%s: utimensat: %s", path, strerror(errno));
                goto out;
            }
        }
    }
    /* The rename is durable only once the directory entry is. */
    if ((rc = keys_sync_dir(dir)) != 0) pep_err_set(err, rc, "%s: fsync: %s", dir, strerror(errno));
out:
    keys_entry_free(e);
    return rc;
}

int keys_load_or_create(const char *data_dir, struct keyring **out, struct pep_err *err) {
    char dir[PATH_MAX];
    struct keyring *k = NULL;
    int rc;

    *out = NULL;
    if ((rc = keys_dir_path(data_dir, dir, err)) != 0) return rc;
    if ((rc = keys_load_dir(dir, true, &k, err)) != 0) return rc;
    if (k->len == 0) {
        keys_free(k);
        k = NULL;
        if ((rc = keys_create_file(dir, NULL, err)) != 0) return rc;
        /* Read back what is on disk, so the keyring is exactly what a restart loads. */
        if ((rc = keys_load_dir(dir, true, &k, err)) != 0) return rc;
        if (PEP_NEVER(k->len == 0)) {
            keys_free(k);
            return pep_err_set(err, PEP_EIO, "%s: the new key did not load", dir);
        }
    }
    snprintf(k->dir, sizeof k->dir, "%s", dir);
    *out = k;
    return 0;
}

int keys_rotate(const char *data_dir, struct keyring **out, struct pep_err *err) {
    char dir[PATH_MAX];
    struct keyring *k = NULL;
    struct timespec newest;
    int rc;

    *out = NULL;
    if ((rc = keys_dir_path(data_dir, dir, err)) != 0) return rc;
    if ((rc = keys_load_dir(dir, true, &k, err)) != 0) return rc;
    bool have = k->len > 0;
    if (have) newest = k->active->mtime;
    keys_free(k);
    k = NULL;
    if ((rc = keys_create_file(dir, have ? &newest : NULL, err)) != 0) return rc;
    if ((rc = keys_load_dir(dir, true, &k, err)) != 0) return rc;
    snprintf(k->dir, sizeof k->dir, "%s", dir);
    *out = k;
    return 0;
}

int keys_load_readonly(const char *dir, struct keyring **out, struct pep_err *err) {
    *out = NULL;
    struct keyring *k = NULL;
    int rc = keys_load_dir(dir, false, &k, err);
    if (rc != 0) return rc;
    if (k->len == 0) {
        keys_free(k);
        return pep_err_set(err, PEP_ENOTFOUND, "%s: no key", dir);
    }
    *out = k;
    return 0;
}

/* ---- lookups, states, JWKS -------------------------------------------------------------- */

size_t keys_count(const struct keyring *k) {
    return __atomic_load_n(&k->len, __ATOMIC_RELAXED);
}

const char *keys_active_kid(const struct keyring *k) {
    return keys_active(k)->kid;
}

const unsigned char *keys_active_private_pem(const struct keyring *k, size_t *len) {
    const struct keys_entry *e = keys_active(k);
    *len = e->private_pem_len;
    return e->private_pem;
}

static enum keys_state keys_entry_state(const struct keyring *k, const struct keys_entry *e,
                                        int64_t now_s) {
    if (e == keys_active(k)) return KEYS_ACTIVE;
    return now_s < __atomic_load_n(&e->retires_at_s, __ATOMIC_ACQUIRE) ? KEYS_VERIFYING
                                                                       : KEYS_RETIRED;
}

const char *keys_state_name(enum keys_state st) {
    switch (st) {
    case KEYS_ACTIVE:
        return "active";
    case KEYS_VERIFYING:
        return "verifying";
    case KEYS_RETIRED:
        return "retired";
    case KEYS_UNKNOWN:
        break;
    }
    return "unknown";
}

enum keys_state keys_state_of(const struct keyring *k, const char *kid, int64_t now_s) {
    const struct keys_entry *e = keys_find(k, kid);
    return e ? keys_entry_state(k, e, now_s) : KEYS_UNKNOWN;
}

const unsigned char *keys_public_pem(const struct keyring *k, const char *kid, size_t *len) {
    const struct keys_entry *e = keys_find(k, kid);
    if (!e) return NULL;
    if (len) *len = e->public_pem_len;
    return e->public_pem;
}

EVP_PKEY *keys_public_key(const struct keyring *k, const char *kid) {
    const struct keys_entry *e = keys_find(k, kid);
    return e ? e->public_key : NULL;
}

EVP_PKEY *keys_token_key(const struct keyring *k, const char *kid, int64_t now_s) {
    const struct keys_entry *e = keys_find(k, kid);
    /* SECURITY: a retired key verifies no token, whatever its claims say. */
    return e && keys_entry_state(k, e, now_s) != KEYS_RETIRED ? e->public_key : NULL;
}

static json_t *keys_jwk(const struct keys_entry *e) {
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "kty", "EC", "crv", "P-256", "x", e->x,
                     "y", e->y, "kid", e->kid, "alg", "ES256", "use", "sig");
}

json_t *keys_jwks_at(const struct keyring *k, int64_t now_s) {
    json_t *keys = json_array();
    json_t *set = NULL;
    if (!keys) return NULL;
    const struct keys_entry *active = keys_active(k);
    if (json_array_append_new(keys, keys_jwk(active)) != 0) goto fail;
    for (const struct keys_entry *e = keys_head(k); e; e = e->older) {
        if (e == active || keys_entry_state(k, e, now_s) != KEYS_VERIFYING) continue;
        if (json_array_append_new(keys, keys_jwk(e)) != 0) goto fail;
    }
    set = json_object();
    if (!set) goto fail;
    int rc = json_object_set_new(set, "keys", keys);
    keys = NULL; /* json_object_set_new consumes it, even on failure */
    if (rc != 0) goto fail;
    return set;
fail:
    json_decref(keys);
    json_decref(set);
    return NULL;
}

json_t *keys_jwks(const struct keyring *k) {
    return keys_jwks_at(k, pep_now_us() / 1000000);
}

/* An RFC 3339 time of whole seconds, or null. */
static json_t *keys_time_json(int64_t s) {
    char at[32];
    pep_format_rfc3339_us(s * 1000000, at);
    return json_string(at);
}

json_t *keys_list_json(const struct keyring *k, int64_t now_s) {
    json_t *list = json_array();
    /* Walked newest first, listed oldest first: each key is inserted at the front. */
    for (const struct keys_entry *e = keys_head(k); list && e; e = e->older) {
        enum keys_state st = keys_entry_state(k, e, now_s);
        int64_t out = __atomic_load_n(&e->rotated_out_at_s, __ATOMIC_ACQUIRE);
        int64_t ret = __atomic_load_n(&e->retires_at_s, __ATOMIC_ACQUIRE);
        json_t *item = json_pack(
            "{s:s, s:s, s:o, s:o, s:o}", "kid", e->kid, "state", keys_state_name(st), "created_at",
            keys_time_json(e->created_at_s), "rotated_out_at",
            st != KEYS_ACTIVE && out > 0 ? keys_time_json(out) : json_null(), "retires_at",
            st != KEYS_ACTIVE && ret != KEYS_NEVER ? keys_time_json(ret) : json_null());
        if (!item || json_array_insert_new(list, 0, item) != 0) {
            json_decref(list);
            list = NULL;
        }
    }
    return list ? json_pack("{s:o}", "keys", list) : NULL;
}

/* ---- rotation ------------------------------------------------------------------------------ */

struct keys_rotation {
    struct keyring *k;
    struct keys_entry *fresh; /* the new key; the ring's once committed */
    struct keys_entry *old;   /* the key that signs until the commit */
    int64_t now_s;            /* the rotation's time: the new key's created_at */
    int64_t retires_at_s;     /* when the old key retires (≥ now_s) */
    char pending[PATH_MAX];   /* DATA/keys/<kid>.pem.pending */
    char final[PATH_MAX];     /* DATA/keys/<kid>.pem */
};

int keys_rotation_begin(struct keyring *k, int64_t now_s, struct keys_rotation **out,
                        struct pep_err *err) {
    struct keys_rotation *rot = NULL;
    int rc;
    *out = NULL;
    if (!k->dir[0]) return pep_err_set(err, PEP_EINVAL, "a read-only key ring cannot rotate");
    pthread_mutex_lock(&k->rotate_lock);
    rot = calloc(1, sizeof *rot);
    if (!rot) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto fail;
    }
    rot->k = k;
    rot->now_s = now_s;
    rot->retires_at_s = now_s;
    if ((rc = keys_generate(&rot->fresh, err)) != 0) goto fail;
    if (snprintf(rot->final, sizeof rot->final, "%s/%s.pem", k->dir, rot->fresh->kid) >=
            (int)sizeof rot->final ||
        snprintf(rot->pending, sizeof rot->pending, "%s%s", rot->final, KEYS_PENDING_SUFFIX) >=
            (int)sizeof rot->pending) {
        rc = pep_err_set(err, PEP_EINVAL, "%s: path too long", k->dir);
        goto fail;
    }
    if (PEP_NEVER(keys_find(k, rot->fresh->kid) != NULL)) {
        rc = pep_err_set(err, PEP_EEXISTS, "the new key's kid is held already");
        goto fail;
    }
    /* The key is on disk before anything says it signs; under a name no load takes for a
     * key until the rotation's record committed. */
    if ((rc = pep_write_file_atomic(rot->pending, rot->fresh->private_pem,
                                    rot->fresh->private_pem_len, 0600)) != 0 ||
        (rc = keys_sync_dir(k->dir)) != 0) {
        pep_err_set(err, rc, "cannot write %s: %s", rot->pending, strerror(errno));
        unlink(rot->pending);
        goto fail;
    }
    pthread_rwlock_wrlock(&k->sign_lock);
    rot->old = keys_active(k);
    *out = rot;
    return 0;
fail:
    if (rot) keys_entry_free(rot->fresh);
    free(rot);
    pthread_mutex_unlock(&k->rotate_lock);
    return rc;
}

const char *keys_rotation_new_kid(const struct keys_rotation *rot) {
    return rot->fresh->kid;
}

const char *keys_rotation_old_kid(const struct keys_rotation *rot) {
    return rot->old->kid;
}

int64_t keys_rotation_old_signs_since(const struct keys_rotation *rot) {
    /* Only a key some rotation brought in has a row while it is active: the data dir's
     * first key gets its row when it is rotated out, and signed everything before. */
    return rot->old->in_store ? rot->old->created_at_s : INT64_MIN;
}

int64_t keys_rotation_old_unrecorded_exp(const struct keys_rotation *rot,
                                         bool (*recorded)(void *arg, const char *jti), void *arg) {
    struct keyring *k = rot->k;
    int64_t latest = 0;
    pthread_mutex_lock(&k->recent_lock);
    for (size_t i = 0; i < rot->old->recent_len; i++) {
        const struct keys_recent *r = &rot->old->recent[i];
        if (r->exp > latest && !(r->jti[0] && recorded && recorded(arg, r->jti))) latest = r->exp;
    }
    pthread_mutex_unlock(&k->recent_lock);
    return latest;
}

/* Notes a token e signed (caller holds sign_lock for reading): drops the signatures older
 * than KEYS_RECENT_US from the front, appends this one.  Memory running out only costs the
 * note (the rotation then relies on the store alone), so it is not an error. */
static void keys_note_signature(const struct keyring *k, struct keys_entry *e, const json_t *claims,
                                int64_t exp) {
    pthread_mutex_t *lock = (pthread_mutex_t *)&k->recent_lock;
    int64_t now = pep_mono_us();
    const char *jti = json_string_value(json_object_get(claims, "jti"));
    pthread_mutex_lock(lock);
    size_t old = 0;
    while (old < e->recent_len && now - e->recent[old].signed_mono_us > KEYS_RECENT_US)
        old++;
    if (old > 0) {
        memmove(e->recent, e->recent + old, (e->recent_len - old) * sizeof *e->recent);
        e->recent_len -= old;
    }
    if (e->recent_len == e->recent_cap) {
        size_t ncap = e->recent_cap ? 2 * e->recent_cap : 16;
        struct keys_recent *grown = realloc(e->recent, ncap * sizeof *grown);
        if (grown) {
            e->recent = grown;
            e->recent_cap = ncap;
        }
    }
    if (e->recent_len < e->recent_cap) {
        struct keys_recent *r = &e->recent[e->recent_len++];
        r->exp = exp;
        r->signed_mono_us = now;
        r->jti[0] = '\0';
        if (jti && strlen(jti) < sizeof r->jti) memcpy(r->jti, jti, strlen(jti) + 1);
    }
    pthread_mutex_unlock(lock);
}

void keys_rotation_set_retires_at(struct keys_rotation *rot, int64_t retires_at_s) {
    rot->retires_at_s = retires_at_s > rot->now_s ? retires_at_s : rot->now_s;
}

int64_t keys_rotation_retires_at(const struct keys_rotation *rot) {
    return rot->retires_at_s;
}

/* Runs one statement with the bound values: "k" text, "i" int64, "n" NULL. */
static int keys_sql_exec(sqlite3 *db, const char *sql, const char *types, ...) {
    sqlite3_stmt *st = NULL;
    va_list ap;
    int rc = PEP_EDB;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) return PEP_EDB;
    va_start(ap, types);
    for (int i = 0; types[i]; i++) {
        int brc = SQLITE_OK;
        if (types[i] == 't')
            brc = sqlite3_bind_text(st, i + 1, va_arg(ap, const char *), -1, SQLITE_TRANSIENT);
        else if (types[i] == 'i')
            brc = sqlite3_bind_int64(st, i + 1, va_arg(ap, int64_t));
        else
            brc = sqlite3_bind_null(st, i + 1);
        if (brc != SQLITE_OK) goto out;
    }
    if (sqlite3_step(st) == SQLITE_DONE) rc = 0;
out:
    va_end(ap);
    sqlite3_finalize(st);
    return rc;
}

int keys_sql_rotate(sqlite3 *db, void *arg) {
    const struct keys_rotation *rot = arg;
    /* The data dir's first key has no row until now: it gets one as it goes out. */
    int rc =
        keys_sql_exec(db,
                      "INSERT INTO signing_keys (kid, created_at, rotated_out_at, retires_at)"
                      " VALUES (?1, ?2, ?3, ?4) ON CONFLICT (kid) DO UPDATE SET"
                      " rotated_out_at = excluded.rotated_out_at,"
                      " retires_at = excluded.retires_at",
                      "tiii", rot->old->kid, rot->old->created_at_s, rot->now_s, rot->retires_at_s);
    if (rc == 0)
        rc = keys_sql_exec(db,
                           "INSERT INTO signing_keys (kid, created_at, rotated_out_at, retires_at)"
                           " VALUES (?1, ?2, NULL, NULL) ON CONFLICT (kid) DO UPDATE SET"
                           " created_at = excluded.created_at, rotated_out_at = NULL,"
                           " retires_at = NULL",
                           "ti", rot->fresh->kid, rot->now_s);
    return rc;
}

/* Ends a rotation: lets signatures go on, frees rot (not its key, if the ring took it). */
static void keys_rotation_end(struct keys_rotation *rot) {
    struct keyring *k = rot->k;
    pthread_rwlock_unlock(&k->sign_lock);
    pthread_mutex_unlock(&k->rotate_lock);
    free(rot);
}

void keys_rotation_commit(struct keys_rotation *rot) {
    struct keyring *k = rot->k;
    struct keys_entry *old = rot->old, *fresh = rot->fresh;
    if (rename(rot->pending, rot->final) != 0 || keys_sync_dir(k->dir) != 0)
        fprintf(stderr,
                "pep: keys: cannot rename %s to %s (%s); the next start finishes it: the store "
                "says key %s signs\n",
                rot->pending, rot->final, strerror(errno), fresh->kid);
    /* Retirement first, then the new key published, then made active: a reader never sees
     * the old key out without its end, nor an active key missing from the list. */
    __atomic_store_n(&old->retires_at_s, rot->retires_at_s, __ATOMIC_RELEASE);
    __atomic_store_n(&old->rotated_out_at_s, rot->now_s, __ATOMIC_RELEASE);
    old->in_store = true;
    fresh->created_at_s = rot->now_s;
    fresh->retires_at_s = KEYS_NEVER;
    fresh->in_store = true;
    clock_gettime(CLOCK_REALTIME, &fresh->mtime);
    keys_push(k, fresh);
    __atomic_store_n(&k->active, fresh, __ATOMIC_RELEASE);
    fprintf(stderr, "pep: keys: key %s signs from now on; key %s verifies until %lld\n", fresh->kid,
            old->kid, (long long)rot->retires_at_s);
    keys_rotation_end(rot);
}

void keys_rotation_abort(struct keys_rotation *rot) {
    if (unlink(rot->pending) == 0) keys_sync_dir(rot->k->dir);
    keys_entry_free(rot->fresh);
    keys_rotation_end(rot);
}

/* ---- the store's record of rotations --------------------------------------------------------- */

/* One signing_keys row. */
struct keys_row {
    char kid[KEYS_KID_LEN + 1];
    int64_t created_at_s;
    bool active; /* rotated_out_at NULL */
    int64_t rotated_out_at_s;
    int64_t retires_at_s;
};

/* Reads the table into *rows (malloc'd) and *n.  0 or PEP_EDB/PEP_ENOMEM with err. */
static int keys_sql_rows(sqlite3 *db, struct keys_row **rows, size_t *n, struct pep_err *err) {
    sqlite3_stmt *st = NULL;
    size_t cap = 0;
    int rc = 0, step;
    *rows = NULL;
    *n = 0;
    if (sqlite3_prepare_v2(db,
                           "SELECT kid, created_at, rotated_out_at, coalesce(retires_at, 0)"
                           " FROM signing_keys ORDER BY created_at, kid",
                           -1, &st, NULL) != SQLITE_OK)
        return pep_err_set(err, PEP_EDB, "signing_keys: %s", sqlite3_errmsg(db));
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        const char *kid = (const char *)sqlite3_column_text(st, 0);
        if (!kid || strlen(kid) != KEYS_KID_LEN) {
            fprintf(stderr, "pep: warning: signing_keys holds a malformed kid; ignored\n");
            continue;
        }
        if (*n == cap) {
            size_t ncap = cap ? 2 * cap : 8;
            struct keys_row *grown = realloc(*rows, ncap * sizeof *grown);
            if (!grown) {
                rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
                break;
            }
            *rows = grown;
            cap = ncap;
        }
        struct keys_row *r = &(*rows)[(*n)++];
        memcpy(r->kid, kid, KEYS_KID_LEN + 1);
        r->created_at_s = sqlite3_column_int64(st, 1);
        r->active = sqlite3_column_type(st, 2) == SQLITE_NULL;
        r->rotated_out_at_s = sqlite3_column_int64(st, 2);
        r->retires_at_s = sqlite3_column_int64(st, 3);
    }
    if (rc == 0 && step != SQLITE_DONE)
        rc = pep_err_set(err, PEP_EDB, "signing_keys: %s", sqlite3_errmsg(db));
    sqlite3_finalize(st);
    if (rc) {
        free(*rows);
        *rows = NULL;
        *n = 0;
    }
    return rc;
}

/* Deletes every <kid>.pem.pending of the ring's directory but keep_kid's (NULL: all): keys
 * of rotations that never committed, which signed nothing. */
static void keys_remove_stale_pending(const struct keyring *k, const char *keep_kid) {
    DIR *d = opendir(k->dir);
    bool removed = false;
    if (!d) return;
    for (struct dirent *de; (de = readdir(d));) {
        size_t n = strlen(de->d_name), suffix = strlen(".pem" KEYS_PENDING_SUFFIX);
        if (de->d_name[0] == '.' || n <= suffix ||
            strcmp(de->d_name + n - suffix, ".pem" KEYS_PENDING_SUFFIX) != 0)
            continue;
        if (keep_kid && n - suffix == KEYS_KID_LEN &&
            memcmp(de->d_name, keep_kid, KEYS_KID_LEN) == 0)
            continue;
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", k->dir, de->d_name) >= (int)sizeof path) continue;
        if (unlink(path) == 0) {
            fprintf(stderr,
                    "pep: keys: removed %s, the key of a rotation that was never recorded\n", path);
            removed = true;
        }
    }
    closedir(d);
    if (removed) keys_sync_dir(k->dir);
}

/* The store says kid signs but keys/<kid>.pem is not there: a rotation committed before
 * its rename.  Finishes it and adds the key to the ring.  0, or a negative code. */
static int keys_finish_rename(struct keyring *k, const char *kid, struct keys_entry **out,
                              struct pep_err *err) {
    char final[PATH_MAX], pending[PATH_MAX];
    *out = NULL;
    if (snprintf(final, sizeof final, "%s/%s.pem", k->dir, kid) >= (int)sizeof final ||
        snprintf(pending, sizeof pending, "%s%s", final, KEYS_PENDING_SUFFIX) >=
            (int)sizeof pending)
        return pep_err_set(err, PEP_EINVAL, "%s: path too long", k->dir);
    if (rename(pending, final) != 0)
        return pep_err_set(err, PEP_ENOTFOUND,
                           "the store says key %s signs, but %s is missing (and no %s): restore "
                           "the keys directory",
                           kid, final, pending);
    keys_sync_dir(k->dir);
    fprintf(stderr, "pep: keys: finished the rotation to key %s (%s)\n", kid, final);
    struct keys_entry *e = calloc(1, sizeof *e);
    if (!e) return pep_err_set(err, PEP_ENOMEM, "out of memory");
    int rc = keys_load_file(final, true, e, err);
    if (rc == 0 && strcmp(e->kid, kid) != 0)
        rc = pep_err_set(err, PEP_ECRYPTO, "%s holds key %s, not %s", final, e->kid, kid);
    if (rc) {
        keys_entry_free(e);
        return rc;
    }
    keys_push(k, e);
    *out = e;
    return 0;
}

int keys_sql_load(struct keyring *k, sqlite3 *db, struct pep_err *err) {
    struct keys_row *rows = NULL;
    size_t n = 0;
    int rc = keys_sql_rows(db, &rows, &n, err);
    if (rc) return rc;
    const struct keys_row *active_row = NULL;
    for (size_t i = 0; i < n; i++) {
        if (!rows[i].active) continue;
        /* One rotation at a time writes the rows: two active ones mean the table was
         * edited.  The newest wins, loudly. */
        if (active_row)
            fprintf(stderr, "pep: warning: signing_keys names %s and %s active; %s signs\n",
                    active_row->kid, rows[i].kid, rows[i].kid);
        active_row = &rows[i];
    }
    if (k->dir[0]) keys_remove_stale_pending(k, active_row ? active_row->kid : NULL);
    if (n == 0) goto out; /* no rotation yet: the files say it all */
    struct keys_entry *active = NULL;
    if (active_row) {
        active = keys_find(k, active_row->kid);
        if (!active && k->dir[0] &&
            (rc = keys_finish_rename(k, active_row->kid, &active, err)) != 0)
            goto out;
        if (!active) {
            rc = pep_err_set(err, PEP_ENOTFOUND, "the store says key %s signs, but it is missing",
                             active_row->kid);
            goto out;
        }
    } else {
        fprintf(stderr, "pep: warning: signing_keys names no active key; key %s signs\n",
                keys_active(k)->kid);
    }
    for (struct keys_entry *e = keys_head(k); e; e = e->older) {
        const struct keys_row *row = NULL;
        for (size_t i = 0; i < n && !row; i++)
            if (strcmp(rows[i].kid, e->kid) == 0) row = &rows[i];
        if (!row) {
            /* SECURITY: a key file no rotation made is not trusted with tokens. */
            if (e != active && active)
                fprintf(stderr,
                        "pep: warning: key %s is in the keys directory but no rotation made it: "
                        "it verifies checkpoints only\n",
                        e->kid);
            if (e != active && active) __atomic_store_n(&e->retires_at_s, 0, __ATOMIC_RELEASE);
            continue;
        }
        e->in_store = true;
        e->created_at_s = row->created_at_s;
        if (!row->active) {
            __atomic_store_n(&e->rotated_out_at_s, row->rotated_out_at_s, __ATOMIC_RELEASE);
            __atomic_store_n(&e->retires_at_s, row->retires_at_s, __ATOMIC_RELEASE);
        }
    }
    for (size_t i = 0; i < n; i++)
        if (!rows[i].active && !keys_find(k, rows[i].kid))
            fprintf(stderr,
                    "pep: warning: key %s of the store is missing from the keys directory: the "
                    "checkpoints it signed no longer verify\n",
                    rows[i].kid);
    if (active) __atomic_store_n(&k->active, active, __ATOMIC_RELEASE);
out:
    free(rows);
    return rc;
}

/* ---- signing ------------------------------------------------------------------------------- */

/*
 * ES256 over input with e's key pair, as a JWS carries it (RFC 7518 3.4): EVP_DigestSign
 * answers a DER ECDSA-Sig-Value, whose INTEGERs drop leading zero bytes (and add one when
 * the top bit is set), so R and S are re-padded to exactly 32 bytes each.  Returns 0 or
 * PEP_ECRYPTO / PEP_ENOMEM.
 */
static int keys_sign_es256(const struct keys_entry *e, const void *input, size_t len,
                           uint8_t out[KEYS_ES256_SIG_LEN]) {
    unsigned char der[KEYS_ES256_DER_MAX];
    size_t der_len = sizeof der;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    ECDSA_SIG *sig = NULL;
    const BIGNUM *r, *s;
    int rc = PEP_ECRYPTO;

    if (!ctx) return PEP_ENOMEM;
    if (EVP_PKEY_get_size(e->pkey) > (int)sizeof der ||
        EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, e->pkey) != 1 ||
        EVP_DigestSign(ctx, der, &der_len, input, len) != 1)
        goto out;
    const unsigned char *p = der;
    sig = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
    if (!sig || p != der + der_len) goto out;
    ECDSA_SIG_get0(sig, &r, &s);
    if (BN_bn2binpad(r, out, KEYS_ES256_SIG_LEN / 2) != KEYS_ES256_SIG_LEN / 2 ||
        BN_bn2binpad(s, out + KEYS_ES256_SIG_LEN / 2, KEYS_ES256_SIG_LEN / 2) !=
            KEYS_ES256_SIG_LEN / 2)
        goto out;
    rc = 0;
out:
    if (rc) ERR_clear_error();
    ECDSA_SIG_free(sig);
    EVP_MD_CTX_free(ctx);
    return rc;
}

/* base64url of a JSON value serialized as libjwt does (compact, sorted keys); malloc'd or
 * NULL. */
static char *keys_json_b64url(const json_t *j) {
    char *text = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    if (!text) return NULL;
    char *b64 = pep_base64url_encode((const uint8_t *)text, strlen(text));
    free(text);
    return b64;
}

int keys_sign_claims(const struct keyring *k, const json_t *claims, char **jwt_out,
                     struct pep_err *err) {
    json_t *header = NULL;
    char *head64 = NULL, *body64 = NULL, *sig64 = NULL, *jwt = NULL;
    uint8_t sig[KEYS_ES256_SIG_LEN];
    int rc;

    *jwt_out = NULL;
    if (!json_is_object(claims))
        return pep_err_set(err, PEP_EINVAL, "claims must be a JSON object");
    /* A token: its key must remember its exp, and a rotation deciding when that key
     * retires must not miss it.  sign_lock is the ring's only mutable part a signer
     * touches (hence the cast); checkpoints (no exp) never wait for a rotation, which may
     * be waiting for the audit writer that signs them. */
    json_t *exp = json_object_get(claims, "exp");
    bool token = json_is_integer(exp);
    pthread_rwlock_t *lock = (pthread_rwlock_t *)&k->sign_lock;
    if (token) pthread_rwlock_rdlock(lock);
    struct keys_entry *active = keys_active(k);
    header = json_pack("{s:s, s:s, s:s}", "alg", "ES256", "kid", active->kid, "typ", "JWT");
    if (!header || !(head64 = keys_json_b64url(header))) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    if (!(body64 = keys_json_b64url(claims))) {
        rc = pep_err_set(err, PEP_EINVAL, "cannot serialize the claims");
        goto out;
    }
    size_t head_len = strlen(head64), body_len = strlen(body64);
    /* "header.payload.signature": 86 base64url characters for the 64-byte signature. */
    size_t cap = head_len + 1 + body_len + 1 + (KEYS_ES256_SIG_LEN * 4 + 2) / 3 + 1;
    jwt = malloc(cap);
    if (!jwt) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    memcpy(jwt, head64, head_len);
    jwt[head_len] = '.';
    memcpy(jwt + head_len + 1, body64, body_len);
    size_t signed_len = head_len + 1 + body_len;
    if ((rc = keys_sign_es256(active, jwt, signed_len, sig)) != 0) {
        pep_err_set(err, rc, "cannot sign the JWT");
        goto out;
    }
    if (!(sig64 = pep_base64url_encode(sig, sizeof sig))) {
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
        goto out;
    }
    if (PEP_NEVER(signed_len + 1 + strlen(sig64) + 1 > cap)) {
        rc = pep_err_set(err, PEP_ECRYPTO, "signature longer than expected");
        goto out;
    }
    jwt[signed_len] = '.';
    memcpy(jwt + signed_len + 1, sig64, strlen(sig64) + 1);
    if (token) keys_note_signature(k, active, claims, (int64_t)json_integer_value(exp));
    *jwt_out = jwt;
    jwt = NULL;
    rc = 0;
out:
    if (token) pthread_rwlock_unlock(lock);
    free(jwt);
    free(sig64);
    free(body64);
    free(head64);
    json_decref(header);
    return rc;
}

char *keys_sign_checkpoint(const struct keyring *k, int64_t seq, const uint8_t hash[32],
                           int64_t now_s) {
    char hex[65];
    char *jwt = NULL;
    pep_hex(hash, 32, hex);
    json_t *claims =
        json_pack("{s:I, s:s, s:I}", "seq", (json_int_t)seq, "hash", hex, "iat", (json_int_t)now_s);
    if (!claims) return NULL;
    if (keys_sign_claims(k, claims, &jwt, NULL) != 0) jwt = NULL;
    json_decref(claims);
    return jwt;
}
